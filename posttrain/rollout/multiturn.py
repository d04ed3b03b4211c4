"""Multi-turn rollouts in an environment, on token-exact trajectories.

A trajectory is built by appending, never by re-rendering: each turn the engine samples from the token ids held so
far, and those sampled ids are kept exactly as sampled; the environment's reply is rendered through the chat
template's *delta* for that turn (the template's rendering of the chat with the reply, minus the text already held)
and only that delta is tokenized and appended. So the ids trained on are the ids the model sampled, plus the
environment's tokens, position by position; nothing a template or a decode -> encode round trip could change is
ever re-tokenized.

The delta only exists where the template has the prefix property at that turn: the text held (the rendered prompt,
the sampled turns decoded with their special tokens, the earlier deltas) is a prefix of the template's rendering of
the chat so far plus the reply. Some templates break it (one that drops earlier ``<think>`` blocks, one that
re-renders a tool call the model spaced its own way, a turn ended by EOS where the template closes with its own
end-of-turn). There the trajectory splits: the tokens so far become one training sample, and the next sample starts
from the template's rendering of the whole chat (context, never trained) and goes on sampling from it, which is
what the model sees at inference under that template. Splits are counted and logged.

A turn cut at ``max_new_tokens`` (no stop token) ends its trajectory with reward 0: the environment is not asked to
read half a message. The held ids are capped at ``max_tokens`` the same way.

The environment is duck-typed (``envs.Environment``: ``tools``, ``reset(row)``, ``step(message)``); the sampled text
becomes a message through the template style's parser (``data.toolcalls``). Every rendering goes through
``data.render.render_prompt``, the renderer SFT's tool chats use, so a template that drops tool calls or results
fails here as it does there.

Layer 3 (rollout): imports data, models, rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from posttrain.data.render import render_prompt
from posttrain.data.toolcalls import parse_assistant

Message = dict[str, Any]


@dataclass
class Segment:
    """One training sample of a trajectory: context ``prompt_ids``, then ``ids`` (sampled and environment tokens)."""
    prompt_ids: list[int]
    prompt_text: str
    ids: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)  # per token of ids: the model sampled it (it carries loss)
    logprobs: list[float] = field(default_factory=list)  # the engine's log-prob per token of ids (0.0 for env tokens)
    text: str = ""  # the exact text of ``ids``: sampled tokens decoded with their special tokens, then the deltas

    def held_text(self) -> str:
        return self.prompt_text + self.text


@dataclass
class Trajectory:
    row: int  # index of the prompt row
    messages: list[Message]  # the chat as the environment saw it (opening messages, parsed turns, replies)
    segments: list[Segment]
    reward: float = 0.0
    turns: int = 0
    splits: int = 0
    finished: bool = True  # False: a turn ran past max_new_tokens, or the held ids past max_tokens
    info: dict[str, float] = field(default_factory=dict)  # the environment's counts, summed over steps

    @property
    def answer(self) -> str:
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), None)
        return "" if last is None else last.get("content") or ""


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass
class TurnSettings:
    max_new_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    batch_size: int


def _extend(seg: Segment, ids: list[int], text: str, sampled: bool, logprobs: list[float] | None = None) -> None:
    seg.ids += ids
    seg.sampled += [sampled] * len(ids)
    seg.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
    seg.text += text


def _reply(tokenizer, traj: Trajectory, obs: list[Message], tools: list[dict] | None,
           chat_template: str | None) -> None:
    """Append the environment's reply: its template delta where the prefix property holds, else a split."""
    traj.messages += obs
    seg = traj.segments[-1]
    full = render_prompt(tokenizer, traj.messages, chat_template, tools or None)
    held = seg.held_text()
    if full.startswith(held):
        delta = full[len(held):]
        _extend(seg, encode(tokenizer, delta), delta, sampled=False)
    else:
        traj.splits += 1
        traj.segments.append(Segment(encode(tokenizer, full), full))


def run_trajectories(engine, tokenizer, make_env: Callable[[], Any], rows: list[dict[str, Any]], row_index: list[int],
                     seeds: list[int], n: int, settings: TurnSettings, *, style: str | None,
                     chat_template: str | None) -> list[Trajectory]:
    """``n`` trajectories of each row (trajectories of row k are k*n .. k*n+n-1), each in a fresh environment.

    Every turn samples all live trajectories in one engine call; turn t of trajectory j of the row seeded s draws
    from seed (s, t, j) alone, so a trajectory does not depend on which others share its call. ``style``: the
    template's tool-call style (``data.toolcalls``); None for an environment without tools (plain answers)."""
    envs = [make_env() for _ in range(len(rows) * n)]
    trajs: list[Trajectory] = []
    for k, row in enumerate(rows):
        for j in range(n):
            env = envs[k * n + j]
            opening = env.reset(row)
            text = render_prompt(tokenizer, opening, chat_template, env.tools or None)
            trajs.append(Trajectory(row_index[k], list(opening), [Segment(encode(tokenizer, text), text)]))
    live = list(range(len(trajs)))
    turn = 0
    while live:
        prompts = [trajs[i].segments[-1].prompt_ids + trajs[i].segments[-1].ids for i in live]
        turn_seeds = [(seeds[i // n] * 1_000_003 + turn * 7_919 + i % n) % 2 ** 62 for i in live]
        ro = engine.sample(prompts, n=1, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                           top_p=settings.top_p, min_new_tokens=0, seeds=turn_seeds, batch_size=settings.batch_size)
        still = []
        for slot, i in enumerate(live):
            traj, env, seg = trajs[i], envs[i], trajs[i].segments[-1]
            ids = ro.completion_ids[slot]
            _extend(seg, ids, decode(tokenizer, ids), sampled=True, logprobs=list(ro.logprobs[slot]))
            traj.turns += 1
            if not ro.finished[slot] or len(seg.prompt_ids) + len(seg.ids) >= settings.max_tokens:
                traj.finished, traj.reward = False, 0.0
                continue
            said = tokenizer.decode(ids, skip_special_tokens=True)
            message = parse_assistant(said, style, turn) if style else {"role": "assistant", "content": said}
            traj.messages.append(message)
            result = env.step(message)
            for key, value in result.info.items():
                traj.info[key] = traj.info.get(key, 0.0) + float(value)
            if result.done or not result.observation:
                traj.reward = float(result.reward)
                continue
            _reply(tokenizer, traj, result.observation, env.tools, chat_template)
            if len(traj.segments[-1].prompt_ids) + len(traj.segments[-1].ids) >= settings.max_tokens:
                traj.finished, traj.reward = False, 0.0
                continue
            still.append(i)
        live = still
        turn += 1
    return trajs


def trajectory_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Per-trajectory means of what a multi-turn rollout logs."""
    n = max(len(trajs), 1)
    keys = sorted({k for t in trajs for k in t.info})
    out = {"agent/turns": sum(t.turns for t in trajs) / n,
           "agent/splits": sum(t.splits for t in trajs) / n,
           "agent/cut": sum(not t.finished for t in trajs) / n}
    out.update({f"agent/{k}": sum(t.info.get(k, 0.0) for t in trajs) / n for k in keys})
    return out


def trajectory_record(traj: Trajectory, rollout: int) -> dict[str, Any]:
    """A trajectory as one JSON line (``trajectories.jsonl``), what ``posttrain render --trajectory`` prints."""
    return {"rollout": rollout, "row": traj.row, "reward": traj.reward, "turns": traj.turns, "splits": traj.splits,
            "finished": traj.finished, "info": traj.info, "messages": traj.messages,
            "segments": [{"prompt_ids": s.prompt_ids, "ids": s.ids, "sampled": s.sampled} for s in traj.segments]}


def highlight_trajectory(tokenizer, record: dict[str, Any]) -> str:
    """Rich markup of a ``trajectory_record``: context (never trained) dim, sampled tokens green, environment
    tokens blue; each split starts a new sample."""
    from rich.markup import escape

    def piece(tok: int) -> str:
        return escape(tokenizer.decode([tok], skip_special_tokens=False))

    out = []
    for k, seg in enumerate(record["segments"]):
        if k:
            out.append("\n[bold red]--- split: the template re-rendered the history; a new sample starts ---[/]\n")
        out.append("".join(f"[dim]{piece(t)}[/]" for t in seg["prompt_ids"]))
        out.append("".join(f"[black on green]{piece(t)}[/]" if s else f"[white on blue]{piece(t)}[/]"
                           for t, s in zip(seg["ids"], seg["sampled"])))
    return "".join(out)
