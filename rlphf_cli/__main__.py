# Lets `python -m rlphf_cli ...` and `accelerate launch -m rlphf_cli ...` run the CLI.
from rlphf_cli.cli.main import main

main()
