"""Resolve every experiment, and every run of every suite, in two trees and print what differs.

    python tools/resolved_configs.py              # 02723cd (before the composed configs) vs the working tree
    python tools/resolved_configs.py --before REV_OR_DIR --after REV_OR_DIR

Each tree resolves in a child process of its own, with its own code (one interpreter per tree, lightning imported
once): an experiment is every ``configs/<dir>/*.yaml`` outside presets/, suites/, recipes/ and data/, resolved as
``train.py fit --config configs/<dir>/<name>.yaml --print_config``; a suite run is the ``train.py fit`` command line
``compare.py run`` builds for it (configs, suite and experiment overrides, logger and seed arguments), likewise with
``--print_config``. The YAML printed is loaded and flattened to dotted keys (list items by index) and compared key by
key: every key whose value differs, or that one side lacks, is printed, nothing is left out; each experiment with
differences is then judged on what it runs (``effective``): "DIFFERENT" names the keys that still differ. A revision is
checked out with ``git worktree add --detach`` under /tmp (and removed afterwards); a directory is used as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
NOT_EXPERIMENTS = ("presets", "suites", "recipes", "data")
BEFORE = "02723cd"  # the commit before the configs were composed from fragments


def experiments(tree: Path) -> list[str]:
    paths = (tree / "configs").glob("*/*.yaml")
    return sorted(p.relative_to(tree).as_posix() for p in paths if p.parent.name not in NOT_EXPERIMENTS)


def suite_runs(tree: Path) -> dict[str, list[str]]:
    """{"suite <name>: <label>": the arguments after ``fit`` of its first seed's run}."""
    from comparison.suite import Runner, load_suite

    runs = {}
    for path in sorted((tree / "configs/suites").glob("*.yaml")):
        suite = load_suite(path)
        runner = Runner(suite, Path(tempfile.gettempdir()) / "resolved-configs-results")
        for experiment in suite.experiments:
            command = runner.command(experiment, suite.seeds[0])
            runs[f"suite {suite.name}: {experiment.label}"] = [str(a).replace(str(tree) + "/", "") for a in command[3:]]
    return runs


def resolve(train, args: list[str]) -> dict:
    out = io.StringIO()
    quiet = contextlib.redirect_stderr(io.StringIO())
    with mock.patch("sys.argv", ["train.py"]), contextlib.redirect_stdout(out), quiet:
        try:
            train.main(["fit", *args, "--print_config"])
        except SystemExit as error:
            if error.code not in (0, None):
                return {"<error>": f"exit {error.code}"}
        except Exception as error:  # noqa: BLE001  (reported as a difference, not hidden)
            return {"<error>": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    import yaml

    return yaml.safe_load(out.getvalue())


def dump(tree: Path) -> None:
    """Child mode: resolve everything in ``tree`` (the current directory) and print one JSON object."""
    sys.path[:] = [str(tree)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    import train

    resolved = {name: resolve(train, ["--config", name]) for name in experiments(tree)}
    resolved.update({name: resolve(train, args) for name, args in suite_runs(tree).items()})
    print(json.dumps(resolved))


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


FOLLOWING_COSINE = "lightning_modules.schedules.CosineAnnealingLR"
TORCH_COSINE = "torch.optim.lr_scheduler.CosineAnnealingLR"


def effective(config: dict) -> dict:
    """What the run gets once train.py and the module fill in what the config leaves to them: a logger ``save_dir`` of
    ``runs`` moves to ``trainer.default_root_dir`` (train.py's _place_logger), and the following cosine schedule is
    torch's with ``T_max = trainer.max_epochs`` (lightning_modules.schedules). ``trainer.default_root_dir`` itself
    then goes where a logger is set: it places a run only without one (checkpoints, profiles), and the logger's
    ``save_dir`` is compared."""
    flat = dict(flatten(config))
    has_logger = "trainer.logger.class_path" in flat
    root = flat.pop("trainer.default_root_dir", None) if has_logger else flat.get("trainer.default_root_dir")
    if root and flat.get("trainer.logger.init_args.save_dir") == "runs":
        flat["trainer.logger.init_args.save_dir"] = root
    for key in [k for k, v in flat.items() if k.endswith("lr_scheduler.class_path") and v == FOLLOWING_COSINE]:
        base = key[: -len("class_path")]
        flat[key] = TORCH_COSINE
        if flat.get(base + "init_args.T_max") is None:
            flat[base + "init_args.T_max"] = flat.get("trainer.max_epochs")
        flat.setdefault(base + "init_args.last_epoch", -1)  # torch's own argument, which the subclass fixes at -1
    return flat


def resolve_tree(tree: Path) -> dict:
    child = subprocess.run([sys.executable, __file__, "--dump", str(tree)], cwd=tree, capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"resolving {tree} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def checkout(rev: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"morphlab-{rev}-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def resolve_rev_or_dir(where: str) -> dict:
    if Path(where).is_dir():
        return resolve_tree(Path(where).resolve())
    tree = checkout(where)
    try:
        return resolve_tree(tree.resolve())
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tree.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help=f"a git revision or a directory (default {BEFORE})")
    parser.add_argument("--after", default=str(ROOT), help="a git revision or a directory (default: the working tree)")
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dump:
        return dump(Path(args.dump).resolve())

    before, after = resolve_rev_or_dir(args.before), resolve_rev_or_dir(args.after)

    identical, same_run, different, keys = [], [], [], {}
    for name in sorted(set(before) | set(after), key=lambda n: (n.startswith("suite "), n)):
        if name not in before or name not in after:
            print(f"{name}: only {'after' if name in after else 'before'}  DIFFERENT")
            different.append(name)
            continue
        errors = [f"{side} {tree[name]['<error>']}" for side, tree in (("before", before), ("after", after))
                  if "<error>" in tree[name]]
        if errors:  # a config that does not resolve is never "identical", even when it fails the same way in both
            print(f"{name}: does not resolve ({'; '.join(errors)})  DIFFERENT")
            different.append(name)
            continue
        a, b = flatten(before[name]), flatten(after[name])
        changed = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
        if not changed:
            identical.append(name)
            continue
        ea, eb = effective(before[name]), effective(after[name])
        still = [k for k in sorted(set(ea) | set(eb)) if ea.get(k, "<absent>") != eb.get(k, "<absent>")]
        (same_run if not still else different).append(name)
        print(f"{name}:{'' if not still else '  DIFFERENT: ' + ', '.join(still)}")
        for key in changed:
            print(f"    {key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
            keys[key] = keys.get(key, 0) + 1
    n_experiments = sum(not n.startswith("suite ") for n in set(before) | set(after))
    print(f"\n{len(set(before) | set(after))} resolved ({n_experiments} experiments and the suite "
          f"runs): {len(identical)} identical, {len(same_run)} printed differently but the same run once T_max and "
          f"save_dir are filled in (and default_root_dir set aside), {len(different)} different")
    for key, count in sorted(keys.items(), key=lambda kv: -kv[1]):
        print(f"    {count:3d} x {key}")
    if different:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
