"""`jointgen <command>`: one entry point; each command lives in its own module with `main(argv)`.
Commands are imported lazily so `jointgen --help` stays fast and `sampler/` never imports Ray."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "pretrain": ("sampler.embedded.pretrain",
                 "train the embedded backbone / judge (masked diffusion / causal)"),
    "teacher": ("ray_jobs.teacher", "decode exact teacher trajectories on Ray actors into Parquet shards"),
    "train": ("ray_jobs.train", "fit the joint sampler on teacher shards with Ray Train"),
    "serve": ("serve.app", "serve backbone + sampler behind an OpenAI-style API (Ray Serve)"),
    "generate": ("ray_jobs.generate", "batch generation over a prompt file with Ray Data"),
    "evaluate": ("ray_jobs.evaluate", "quality vs speed of exact / marginal / joint decoding"),
    "quickstart": ("ray_jobs.quickstart", "the whole method end to end on the embedded backbone"),
    "lm-eval": ("integrations.lm_eval", "lm-evaluation-harness's CLI with the jointgen model"),
}


def usage() -> str:
    lines = ["usage: jointgen <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`jointgen <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"jointgen: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
