"""The CI artifact pipeline: build recipes, sign and verify each artifact, write one JSON report.

    python ci/pipeline.py [RECIPE ...] [--output artifacts] [--report ci-report.json] [--jobs N] [--sign-key KEY.pem]

A recipe is a file or the name of one in recipes/ (tiny-coder-int4); with none, every recipes/*.yaml. Each recipe is built by `moecc build --json` in a process of its
own (one failure does not stop the others), then, with --sign-key, its manifest is signed (manifest.sig,
model-signing with an elliptic-curve key: offline), then `moecc verify --json` checks it (with the
matching public key). Builds share the stage cache under the output folder, which concurrent builds may
use. The report lists per recipe: status, the error if any, stage timings, sizes, accuracy results and
every file's digest. Exit status 1 if any recipe failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT_VERSION = 1


def _moecc(*args: str) -> tuple[int, dict]:
    """Run a moecc command with --json; its exit status and its one JSON object (or the error it printed)."""
    process = subprocess.run([sys.executable, "-m", "compiler.cli", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    try:
        return process.returncode, json.loads(process.stdout)
    except ValueError:  # a crash rather than a reported error: keep what it said
        return process.returncode or 1, {"ok": False, "error": (process.stderr or process.stdout).strip()[-2000:]}


def public_key_of(private_key: Path, folder: Path) -> Path:
    """Write the PEM public key of an elliptic-curve private key into `folder`, for verification."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    public = folder / "signing-key.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def sign_manifest(artifact: Path, private_key: Path) -> None:
    """manifest.sig: a Sigstore bundle over manifest.json, which lists every other file's sha256."""
    import model_signing

    from runtime.artifact import MANIFEST_NAME, SIGNATURE_NAME

    model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key).sign(artifact / MANIFEST_NAME, artifact / SIGNATURE_NAME)


def _entry(recipe: Path, output: Path, sign_key: Path | None, public_key: Path | None) -> dict:
    started = time.perf_counter()
    entry: dict = {"recipe": str(recipe), "status": "failed"}
    code, built = _moecc("build", str(recipe), "--output", str(output))
    if code or not built.get("ok"):
        entry["error"] = f"build: {built.get('error', 'failed')}"
        entry["seconds"] = round(time.perf_counter() - started, 2)
        return entry
    artifact = Path(built["artifact"])
    entry |= {"name": built["name"], "artifact": str(artifact)}
    if sign_key is not None:
        try:
            sign_manifest(artifact, sign_key)
        except Exception as exc:  # a bad key or a failing signer fails this recipe, and the report says why
            entry |= {"error": f"sign: {exc}", "seconds": round(time.perf_counter() - started, 2)}
            return entry
    code, verified = _moecc("verify", str(artifact), *(["--public-key", str(public_key)] if public_key else []))
    _, summary = _moecc("inspect", str(artifact))  # verify ran first: inspect reads only a checked artifact
    if summary.get("ok"):
        entry |= {
            "stages": summary["stages"],
            "sizes": {"total": summary["total_bytes"], **{role: model["bytes"] for role, model in summary["models"].items()}},
            "accuracy": summary["accuracy"],
            "digests": {name: f["sha256"] for name, f in json.loads((artifact / "manifest.json").read_text())["files"].items()},
        }
    entry["signature"] = verified.get("signature")
    if code or not verified.get("ok"):
        entry["error"] = f"verify: {verified.get('error', 'failed')}"
    else:
        entry["status"] = "passed"
    entry["seconds"] = round(time.perf_counter() - started, 2)
    return entry


def run(recipes: list[Path], output: Path, report_path: Path, jobs: int, sign_key: Path | None = None, public_key: Path | None = None) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each build is a process of its own
        entries = list(pool.map(lambda recipe: _entry(recipe, output, sign_key, public_key), recipes))
    report = {
        "report_version": REPORT_VERSION, "ok": all(e["status"] == "passed" for e in entries), "jobs": jobs,
        "seconds": round(time.perf_counter() - started, 2), "recipes": entries,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = report_path.with_name(f".{report_path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=1))
    os.replace(temporary, report_path)  # a reader never sees half a report
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build, sign and verify recipes; write a JSON report; exit 1 on any failure.")
    parser.add_argument("recipes", nargs="*", help="recipe files, or names of recipes in recipes/ (default: every recipes/*.yaml)")
    parser.add_argument("--output", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--report", type=Path, default=ROOT / "ci-report.json")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="recipes built at once (default: half the cores)")
    parser.add_argument("--sign-key", type=Path, default=None, help="PEM elliptic-curve private key: sign each manifest (needs the sign extra)")
    args = parser.parse_args(argv)
    named = [ROOT / "recipes" / f"{arg}.yaml" if "/" not in arg and not arg.endswith(".yaml") else Path(arg) for arg in args.recipes]
    recipes = [path.resolve() for path in named] or sorted((ROOT / "recipes").glob("*.yaml"))
    missing = [str(path) for path in recipes if not path.is_file()]
    if missing:
        print(f"error: no such recipe: {missing[0]}", file=sys.stderr)
        return 2
    if args.sign_key:
        try:
            import model_signing  # noqa: F401  (checked before hours of building)
        except ImportError:
            print("error: --sign-key needs the model-signing library: pip install -e '.[sign]'", file=sys.stderr)
            return 2
        if not args.sign_key.is_file():
            print(f"error: no such signing key: {args.sign_key}", file=sys.stderr)
            return 2
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    public_key = None
    if args.sign_key:
        try:
            public_key = public_key_of(args.sign_key, output)
        except (ValueError, TypeError) as exc:
            print(f"error: {args.sign_key}: not an unencrypted PEM private key ({exc})", file=sys.stderr)
            return 2
    report = run(recipes, output, args.report, args.jobs, args.sign_key, public_key)
    for entry in report["recipes"]:
        print(f"{entry['status']:>6}  {entry.get('name', entry['recipe'])}  {entry['seconds']:.1f}s" + (f"  {entry['error']}" if "error" in entry else ""))
    print(f"report: {args.report}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
