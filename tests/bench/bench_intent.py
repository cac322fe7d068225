"""Intent detection accuracy on the labelled sets (issue #5), run on demand.

    python tests/bench/bench_intent.py [--json]

Every message of tests/data/intents*.json goes through a real taled's
``detect_intent`` tool (cheap signals, and the embedded UX model's judgement when
they are close), and, in the same run, through the signals alone, and through
the UX model's judgement alone. Reports accuracy overall and per class, the
action accuracy of questions about tasks, and how often the model was asked.

The sets: ``intents_dev.json`` tuned the signals; ``intents.json`` was measured
once, then its errors also tuned them; ``intents_holdout.json`` was written
blind by someone who had not seen the detector, measured once (84.3 %), then
its errors tuned the signals too; ``intents_blind.json`` was written blind after
that and has not been used for tuning; ``intents_blind2.json`` (140 items) was
written blind later still, by someone who saw neither the detector nor the other
sets. The two blind sets are the honest estimate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from taled.chat.intent import IntentDetector, judge_messages, parse_vote
from tests.bench.bench_core import machine
from tests.harness import running_daemon

DATA = Path(__file__).resolve().parents[1] / "data"
SETS = (
    "intents_dev.json",
    "intents.json",
    "intents_holdout.json",
    "intents_blind.json",
    "intents_blind2.json",
)
KINDS = ("chat", "task", "unclear")


def score(items: list[dict[str, Any]], predicted: list[tuple[str, str | None]]) -> dict[str, Any]:
    """Accuracy overall and per class, and action accuracy where an action is labelled."""
    per: dict[str, list[int]] = {k: [0, 0] for k in KINDS}
    actions = [0, 0]
    for item, (kind, action) in zip(items, predicted, strict=True):
        per[item["intent"]][1] += 1
        per[item["intent"]][0] += kind == item["intent"]
        if item["action"]:
            actions[1] += 1
            actions[0] += kind == "chat" and action == item["action"]
    right = sum(p[0] for p in per.values())
    return {
        "accuracy": right / len(items),
        "per_class": {k: (p[0] / p[1] if p[1] else None) for k, p in per.items()},
        "counts": {k: p[1] for k, p in per.items()},
        "action_accuracy": actions[0] / actions[1] if actions[1] else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    signals_only = IntentDetector(consult_margin=0.0, model_weight=0.0)
    report: dict[str, Any] = {"machine": machine(), "date": datetime.now(UTC).isoformat()}
    with running_daemon({"TALE_DAEMON__LOG_LEVEL": "warning"}) as daemon:
        for name in SETS:
            items = json.loads((DATA / name).read_text())["items"]
            combined, rules, model, asked = [], [], [], 0
            started = time.perf_counter()
            for item in items:
                got = daemon.call("detect_intent", text=item["text"])
                combined.append((got["kind"], got["action"]))
                asked += got["model_vote"] is not None
                alone = asyncio.run(signals_only.detect(item["text"]))
                rules.append((alone.kind, alone.action))
            seconds = time.perf_counter() - started
            # The model's judgement alone: the same prompt and model, asked every time
            # (in this process; an unreadable answer counts as chat).
            for item in items:
                vote = parse_vote(_direct(judge_messages(item["text"])))
                model.append((vote or "chat", None))
            report[name] = {
                "items": len(items),
                "combined": score(items, combined),
                "signals_only": score(items, rules),
                "model_only": score(items, model),
                "model_consulted": asked,
                "ms_per_message": seconds / len(items) * 1000,
            }
    if options.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['machine']}  {report['date']}")
    for name in SETS:
        r = report[name]
        print(
            f"\n{name}: {r['items']} messages, model consulted on {r['model_consulted']}, "
            f"{r['ms_per_message']:.0f} ms/message"
        )
        for how in ("combined", "signals_only", "model_only"):
            s = r[how]
            classes = "  ".join(
                f"{k} {v * 100:.0f}%" for k, v in s["per_class"].items() if v is not None
            )
            act = s["action_accuracy"]
            print(
                f"  {how:<13} {s['accuracy'] * 100:5.1f}%   {classes}"
                + (f"   actions {act * 100:.0f}%" if act is not None else "")
            )


_LLM: Any = None


def _direct(messages: list[dict[str, str]]) -> str:
    """One completion of the embedded model, loaded as the daemon loads it."""
    global _LLM
    if _LLM is None:
        from llama_cpp import Llama

        from taled.models.backends.llamacpp import embedded_model_path

        _LLM = Llama(model_path=str(embedded_model_path()), n_ctx=2048, verbose=False)
    out = _LLM.create_chat_completion(messages=messages, max_tokens=3, temperature=0.0)
    return str(out["choices"][0]["message"]["content"] or "")


if __name__ == "__main__":
    main()
