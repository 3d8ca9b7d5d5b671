"""Evaluation: pairwise win rates with bootstrap intervals (`winrate`), judging two generation
files against each other (`judging`), and the run report (`report`)."""
