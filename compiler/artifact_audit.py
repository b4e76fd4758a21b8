"""`moecc verify`: everything that can be checked about a built artifact without running it.

In order, each step only after the previous one passed: the manifest's schema and paths and every file's
size and sha256 (runtime.artifact.verify_artifact: no symlinks, no hard links, nothing unlisted); the
external-data references of every ONNX model in it (inside the artifact, to files the manifest lists);
the accuracy gates the build recorded, recomputed from each check's figures and thresholds (so a manifest
edited to say "passed" does not pass); and, when the artifact carries a signature of its manifest
(manifest.sig, from the CI pipeline's signing with model-signing), that signature against a public key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.artifact import MANIFEST_NAME, SIGNATURE_NAME, Manifest, StageRecord, verify_artifact
from runtime.decoder import check_external_data
from runtime.errors import ArtifactError, MoeccError

_SIGN_EXTRA = "pip install -e '.[sign]'"


def _gate_checks(manifest: Manifest) -> list[tuple[StageRecord, dict[str, Any]]]:
    """The recorded accuracy checks: the verify stage's, and the TensorRT lowering's."""
    checks = [(record, record.result if record.stage == "verify" else record.result.get("check")) for record in manifest.stages if record.stage in ("verify", "lower_tensorrt")]
    return [(record, check) for record, check in checks if check is not None]


def _gate_failures(manifest: Manifest) -> list[str]:
    """Accuracy checks whose figures miss their thresholds."""
    failures = []
    for record, check in _gate_checks(manifest):
        where = f"{record.model} model, {record.stage} stage"
        limit, floor = record.config["max_perplexity_increase"], record.config["min_top1_agreement"]
        if not check["finite"]:
            failures.append(f"{where}: non-finite logits")
        if check["perplexity_increase"] > limit:
            failures.append(f"{where}: perplexity {check['perplexity_increase']:+.2%} exceeds the gate's {limit:+.2%}")
        if check["top1_agreement"] < floor:
            failures.append(f"{where}: top-1 agreement {check['top1_agreement']:.3f} below the gate's {floor:.3f}")
        if not check["passed"]:
            failures.append(f"{where}: recorded as failed")
    return failures


def verify_signature(artifact: Path, public_key: Path) -> None:
    """Check manifest.sig (a Sigstore bundle made with an elliptic-curve key) against `public_key`."""
    try:
        import model_signing
    except ImportError:
        raise MoeccError("verifying a signature needs the model-signing library", hint=_SIGN_EXTRA) from None
    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(artifact / MANIFEST_NAME, artifact / SIGNATURE_NAME)
    except Exception as exc:  # model-signing reports a bad signature, a wrong key or a malformed bundle each its own way
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{artifact / SIGNATURE_NAME}: the signature does not verify with {public_key}: {first}", hint="the manifest was altered or signed with another key") from None


def audit(artifact: Path, public_key: Path | None = None) -> dict[str, Any]:
    """Run every check; raise ArtifactError naming the first problem, else return what was checked."""
    manifest = verify_artifact(artifact)
    models = sorted(name for name in manifest.files if name.endswith(".onnx"))
    for model in models:
        check_external_data(artifact, model, set(manifest.files))
    failures = _gate_failures(manifest)
    if failures:
        raise ArtifactError(f"{artifact}: accuracy gate failed: {failures[0]}", hint="rebuild it; the recorded results do not meet their own gates")
    signed = (artifact / SIGNATURE_NAME).is_file()
    if signed and public_key is None:
        raise ArtifactError(f"{artifact}: the manifest is signed, and no public key was given to check the signature", hint="pass --public-key KEY.pub")
    if public_key is not None and not signed:
        raise ArtifactError(f"{artifact}: not signed (no {SIGNATURE_NAME}), but a public key was given", hint="sign it with ci/pipeline.py --sign-key, or drop --public-key")
    if signed:
        verify_signature(artifact, public_key)
    return {"name": manifest.name, "files": len(manifest.files), "bytes": sum(f.size for f in manifest.files.values()), "onnx_models": models,
            "gates": len(_gate_checks(manifest)), "signature": "verified" if signed else "unsigned"}
