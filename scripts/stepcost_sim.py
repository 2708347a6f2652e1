"""How `auto` sizes its trees over a long run, replayed many times with different timing noise.

`record` runs sampled `auto` on Spec-Bench prompts and saves, for every step, the scores of the
nodes `auto` could keep (best first) and the step's measured (nodes, seconds), with the request
boundaries and the load-time prior curve. `simulate` replays those score lists through a fresh
`AutoDrafter`'s own size choice and `StepCost` (`AutoDrafter.choose_size`, the code `auto` runs),
with step times from a model fitted to the recorded ones: t(k) a quadratic in the nodes k
(least squares over all steps), times a residual drawn from the recorded steps' own residuals.
Per seed it reports the expected tokens per ms (1 + the kept scores, over t(k)) and the sizes
chosen, for each probe setting (`AutoDrafter.probe_every`; 0 = no half-size probes).

    python scripts/stepcost_sim.py record steps.json [--skip 12 --limit 2]
    python scripts/stepcost_sim.py simulate steps.json [--seeds 50 --steps 8000 --probe 0,64]
"""
from __future__ import annotations

import argparse
import json
import random

import numpy as np

from auto_ab import add_run_arguments, prompts_and_params  # scripts/ is on the path when run as a script
from fastdecode.drafters.auto import AutoDrafter


def record(args: argparse.Namespace) -> None:
    from fastdecode import LLM

    prompts, params = prompts_and_params(args)
    llm = LLM(threads=args.threads)
    auto = llm.drafter("auto")
    events: list = []  # ["s", scores] | ["o", nodes, seconds] | ["r"]
    choose, observe, new_request = auto.choose_size, auto.step_cost.observe, auto.step_cost.new_request
    auto.choose_size = lambda scores: (events.append(["s", [round(s, 5) for s in scores]]), choose(scores))[1]
    auto.step_cost.observe = lambda nodes, seconds: (events.append(["o", nodes, seconds]), observe(nodes, seconds))[1]
    auto.step_cost.new_request = lambda: (events.append(["r"]), new_request())[1]
    for prompt in prompts:
        conversation = []
        for turn in prompt.turns:
            conversation.append({"role": "user", "content": turn})
            out = llm.chat([conversation], params, method="auto")[0]
            conversation.append({"role": "assistant", "content": out.text})
    prior = np.exp(auto.step_cost.prior - auto.step_cost.prior[0]).tolist()
    with open(args.file, "w") as f:
        json.dump({"prior": prior, "events": events}, f)
    steps = sum(e[0] == "s" for e in events)
    print(f"{steps} steps of {len(prompts)} prompts -> {args.file}")


def simulate(args: argparse.Namespace) -> None:
    with open(args.file) as f:
        data = json.load(f)
    prior, events = data["prior"], data["events"]
    steps = [e[1] for e in events if e[0] == "s"]
    starts = {sum(e[0] == "s" for e in events[:i]) for i, e in enumerate(events) if e[0] == "r"}  # steps opening a request
    obs = np.array([(e[1], e[2]) for e in events if e[0] == "o"])
    coef = np.polyfit(obs[:, 0], obs[:, 1] * 1e3, 2)
    model = lambda k: float(np.polyval(coef, k))  # noqa: E731
    residuals = obs[:, 1] * 1e3 / np.polyval(coef, obs[:, 0])
    print(f"{len(steps)} recorded steps, {len(starts)} requests; t(k) = {coef[2]:.2f} + {coef[1]:.3f} k + "
          f"{coef[0]:.4f} k^2 ms (k = 0 / 8 / 16 / 24: {model(0):.2f} / {model(8):.2f} / {model(16):.2f} / "
          f"{model(24):.2f}); residuals p10 / p50 / p90 / p99 {np.percentile(residuals, [10, 50, 90, 99]).round(3).tolist()}")
    for probe in [int(p) for p in args.probe.split(",")]:
        rows = []
        for seed in range(args.seeds):
            rng = random.Random(seed)
            auto = AutoDrafter({}, lambda n: prior[min(n, len(prior)) - 1])
            auto.probe_every = probe
            offset = rng.randrange(len(steps))  # each seed starts at another step of the recording
            tokens = ms = 0.0
            sizes = []
            for i in range(args.steps):
                j = (offset + i) % len(steps)
                if j in starts or i == 0:
                    auto.step_cost.new_request()
                scores = steps[j]
                k = auto.choose_size(scores)
                auto.step_cost.observe(k, model(k) * rng.choice(residuals) / 1e3)
                tokens += 1 + sum(scores[:k])
                ms += model(k)
                sizes.append(k)
            rows.append((tokens / ms, np.mean(sizes[: args.steps // 4]), np.mean(sizes[-args.steps // 4:])))
        r = np.array(rows)
        worst = np.sort(r[:, 0])[:5]
        print(f"probe_every {probe:4d}: tokens/ms mean {r[:, 0].mean():.4f}, worst five {worst.round(4).tolist()}; "
              f"mean size in the first / last quarter {r[:, 1].mean():.1f} / {r[:, 2].mean():.1f} "
              f"(largest first-quarter mean {r[:, 1].max():.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run sampled auto and save its steps")
    rec.add_argument("file")
    add_run_arguments(rec, limit=2)
    rec.set_defaults(skip=12, temperature=0.7, top_p=0.9)  # held-out prompts, sampled
    sim = sub.add_parser("simulate", help="replay recorded steps with modelled step times")
    sim.add_argument("file")
    sim.add_argument("--seeds", type=int, default=50)
    sim.add_argument("--steps", type=int, default=8000)
    sim.add_argument("--probe", default="0,64", help="probe_every settings, joined by ','")
    args = ap.parse_args()
    (record if args.command == "record" else simulate)(args)


if __name__ == "__main__":
    main()
