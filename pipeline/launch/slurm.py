"""`mmclip submit`: render a job from slurm/ templates and the config's slurm section, check it, sbatch it."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2

from pipeline.config import RunConfig, load_config
from pipeline.errors import UserError
from pipeline.launch.env import REQUEUE_EXIT_CODE

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
FLAGS = {"nodes": int, "tasks_per_node": int, "gpus_per_node": int, "cpus_per_task": int, "time": str,
         "partition": str, "account": str, "qos": str, "mem": str}


def add_submit_args(p) -> None:
    p.add_argument("config", help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key; passed on to the job too")
    p.add_argument("--kind", choices=["train", "eval"], default="train",
                   help="train (one job, requeued on preemption) or eval (a job array over eval.tasks)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    for name, typ in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=f"overrides slurm.{name}")


def _quote(value) -> str:
    return shlex.quote(str(value))


def render_sbatch(cfg: RunConfig, *, config_path: str, overrides: list[str], kind: str = "train",
                  python: str = sys.executable, workdir: str | None = None) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    env.filters["q"] = _quote
    out = Path(cfg.output_dir).resolve()
    sets = " ".join(f"--set {_quote(o)}" for o in overrides)
    config = _quote(Path(config_path).resolve())
    common = {"s": cfg.slurm, "workdir": workdir or str(Path.cwd()), "requeue_code": REQUEUE_EXIT_CODE}
    if kind == "train":
        command = f"{_quote(python)} -m pipeline train {config} --resume latest {sets}".strip()
        return env.get_template("train.sbatch.j2").render(command=command, log=out / "slurm-%j.out", **common)
    if not cfg.eval.tasks:
        raise UserError(f"{config_path}: eval.tasks is empty; nothing to sweep with --kind eval")
    commands = [f"{_quote(python)} -m pipeline eval --checkpoint {_quote(out)} --task {t.task} "
                f"--dataset {_quote(Path(t.dataset).resolve())} --modality {t.modality} "
                f"--output {_quote(out / 'eval' / ((t.name or Path(t.dataset).name) + '.json'))}"
                for t in cfg.eval.tasks]
    return env.get_template("eval_array.sbatch.j2").render(commands=commands, log=out / "slurm-eval-%A_%a.out",
                                                           **common)


def check_script(script: str) -> None:
    proc = subprocess.run([shutil.which("bash") or "/bin/bash", "-n"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"rendered sbatch script has a shell syntax error: {proc.stderr.strip().splitlines()[0]}")


def submit(script_path: Path) -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch not found on PATH; install the Slurm client tools or use --dry-run")
    proc = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        message = " ".join(proc.stderr.strip().splitlines()) or f"exit code {proc.returncode}"
        raise UserError(f"sbatch rejected {script_path}: {message}")
    return proc.stdout.strip().split(";")[0]


def run_submit(args) -> int:
    overrides = list(args.overrides) + [f"slurm.{k}={getattr(args, k)}" for k in FLAGS
                                        if getattr(args, k, None) is not None]
    cfg = load_config(args.config, overrides)
    script = render_sbatch(cfg, config_path=args.config, overrides=overrides, kind=args.kind)
    check_script(script)
    if args.dry_run:
        print(script, end="")
        return 0
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.kind}.sbatch"
    path.write_text(script)
    job = submit(path)
    print(f"submitted {args.kind} job {job}: {path}")
    return 0
