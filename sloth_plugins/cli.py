"""The ``sloth`` command: ``sloth doctor`` (doctor.py) and ``sloth studio`` (the studio package)."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import OPTIONS
from .doctor import DoctorError, doctor, machine_info, machine_report, parse_set, patch_report  # noqa: F401


def studio(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("sloth studio: the web app needs Gradio: pip install 'sloth_plugins[studio]'", file=sys.stderr)
        return 2
    from .studio.app import launch
    from .studio.runs import StudioError
    try:
        launch(args.runs_dir, host=args.host, port=args.port, auth=args.auth, model=args.model)
    except StudioError as exc:
        print(f"sloth studio: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sloth", description="sloth_plugins command line")
    parser.add_argument("--version", action="version", version=f"sloth_plugins {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor_parser = sub.add_parser("doctor", help="print machine capabilities and, for a model, the patch report")
    doctor_parser.add_argument("model", nargs="?",
                               help="local model folder (config.json) or a model_type such as llama")
    doctor_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                               help=f"SlothConfig option for the report, typed by its key "
                                    f"({', '.join(o.name for o in OPTIONS)}), e.g. "
                                    f"--set gradient_checkpointing=recompute, --set kernels=rms_norm,rope, "
                                    f"--set memory_budget_gb=40")
    doctor_parser.add_argument("--json", action="store_true", help="print the machine info and report as JSON")
    studio_parser = sub.add_parser("studio", help="a local web app to train with the plugin (the [studio] extra)")
    studio_parser.add_argument("--port", type=int, default=7860)
    studio_parser.add_argument("--runs-dir", default="sloth-runs", help="one folder per run (default: ./sloth-runs)")
    studio_parser.add_argument("--host", default="127.0.0.1",
                               help="address to listen on (default 127.0.0.1; another one needs --auth)")
    studio_parser.add_argument("--auth", metavar="USER:PASSWORD", help="require this login")
    studio_parser.add_argument("--model", default="", help="model folder to start the form with")
    args = parser.parse_args(argv)
    if args.command == "studio":
        return studio(args)
    try:
        doctor(args)
    except DoctorError as exc:
        print(f"sloth doctor: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
