"""Learning a user's soup over HTTP (rlphf_cli.learning underneath, as `rlphf profile learn`):

- POST /v1/profiles/{user}/compare  {"prompt": optional}  -> a comparison id, the prompt, two answers
- POST /v1/profiles/{user}/feedback {"comparison_id", "pick": "1" | "2" | "=" | "0" (or a, b, tie, bad)}
- GET  /v1/profiles/{user}           -> the point, its uncertainty, the soup

Every pick is saved at once to the --profiles file (atomically, other users kept), so a profile
survives a restart and chat requests with model "soup" and this user get the new soup right away.
The two answers are decoded by the server's own backend, batched with other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from rlphf_cli.errors import InputError
from rlphf_cli.serving.backend import Finish
from rlphf_cli.serving.protocol import ChatRequest, Message
from rlphf_cli.specs import LearnSettings


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    comparison_id: str
    pick: str


class ProfileLearning:
    def __init__(self, service, run_dir: Path | None, prompts: list[str], profiles: Path | None,
                 question_prompts: int | None = None, settings: LearnSettings = LearnSettings()):
        from rlphf_cli.learning import QUESTION_PROMPTS

        self.service = service
        self.run_dir = run_dir
        self.prompts = prompts or ["Tell me about the sea."]
        self.profiles = profiles
        self.question_prompts = question_prompts or QUESTION_PROMPTS
        self.settings = settings
        self.learners: dict = {}
        self._prepared = None
        self._lock = threading.Lock()

    def _error(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        from rlphf_cli.serving.protocol import RequestError

        return RequestError(message, param=param, code=code, status=status)

    def _check(self) -> None:
        if self.profiles is None:
            raise self._error("learning profiles needs a file to keep them: start the server with --profiles FILE",
                              code="profiles_not_enabled")

    async def _answers(self, prompt: str, soups: list) -> list[str]:
        backend = self.service.backend

        async def one(soup) -> str:
            req = ChatRequest(model=soup.key, messages=[Message(role="user", content=prompt)], seed=0)
            job = self.service.job(req)
            text = ""
            try:
                async with contextlib.aclosing(backend.stream(job)) as events:
                    async for event in events:
                        if isinstance(event, Finish) and event.index == 0:
                            text = event.text
            finally:
                job.left_queue()
            return text

        return list(await asyncio.gather(*(one(s) for s in soups)))

    def _learner(self, user: str, loop):
        """This user's Learner (the run's scales and soup features prepared once, on first use)."""
        from rlphf_cli.learning import Learner, learned_picks, prepare, reward_scorer, served_prefs

        def answer(prompt, soups):
            return asyncio.run_coroutine_threadsafe(self._answers(prompt, soups), loop).result()

        with self._lock:
            if self._prepared is None:
                policies = self.service.policies
                if self.run_dir is None:
                    raise self._error("no run directory: learning a soup needs the run's reward models",
                                      code="no_reward_models")
                try:
                    score = reward_scorer(self.run_dir, served_prefs(policies))
                except InputError as exc:
                    raise self._error(str(exc), code="no_reward_models") from None
                scales, table, known = prepare(self.run_dir, policies, score, answer,
                                               self.prompts[:self.question_prompts], self.settings)
                self._prepared = (score, scales, table, known)
            learner = self.learners.get(user)
            if learner is None:
                score, scales, table, known = self._prepared
                learner = Learner(self.service.policies, scales, table, score, answer, settings=self.settings,
                                  picks=learned_picks(self.profiles, user), known=known)
                self.learners[user] = learner
            learner.answer = answer  # the current event loop's
            return learner

    def compare(self, user: str, body: CompareRequest, loop) -> dict:
        self._check()
        learner = self._learner(user, loop)
        comp = learner.ask(body.prompt if body.prompt and body.prompt.strip() else None)
        return {"object": "profile.comparison", "user": user, **comp.public()}

    def feedback(self, user: str, body: FeedbackRequest) -> dict:
        from rlphf_cli.learning import AlreadyAnswered, UnknownComparison, save_profile
        from rlphf_cli.profiling import OUTCOMES, PICK_KEYS
        from rlphf_cli.serving.policies import Soup

        self._check()
        learner = self.learners.get(user)
        pick = PICK_KEYS.get(body.pick, body.pick)
        if pick not in OUTCOMES:
            raise self._error(f"pick '{body.pick}': expected 1, 2, = or 0 (or a, b, tie, bad)", param="pick")
        if learner is None:
            raise self._error(f"comparison '{body.comparison_id}': not asked of user '{user}'",
                              param="comparison_id", code="comparison_not_found", status=404)
        try:
            summary = learner.record(body.comparison_id, pick)
        except UnknownComparison as exc:
            raise self._error(str(exc), param="comparison_id", code="comparison_not_found", status=404) from None
        except AlreadyAnswered as exc:
            raise self._error(str(exc), param="comparison_id", code="already_answered", status=409) from None
        save_profile(self.profiles, user, summary, learner.picks)
        members = summary["members"]
        self.service.profiles[user] = self.service.policies.resolve(members, where="profile") if members else Soup()
        return {"object": "profile", "user": user, **summary}

    def get(self, user: str) -> dict:
        from rlphf_cli.learning import learned_picks
        from rlphf_cli.profiling import axes_of, point_members, replay

        learner = self.learners.get(user)
        if learner is not None:
            return {"object": "profile", "user": user, **learner.summary()}
        if self.profiles is not None:
            picks = learned_picks(self.profiles, user)
            if picks:
                axes = axes_of(self.service.policies)
                post = replay(axes, picks, self.settings)
                return {"object": "profile", "user": user, **post.summary(),
                        "members": point_members(post.mean(), axes), "soup": self.service.profiles[user].key}
        if user in self.service.profiles:
            return {"object": "profile", "user": user, "soup": self.service.profiles[user].key, "picks": 0,
                    "point": None, "uncertainty": None, "members": None}
        raise self._error(f"user '{user}' has no profile", param="user", code="profile_not_found", status=404)
