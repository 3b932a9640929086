"""Artifact bundles: a versioned directory of model files with a checksummed manifest.

    ARTIFACTS/
      current            # text: the version directory name, switched last and atomically
      v20261128-121500/
        manifest.json    # format_version, version, created, configs, feature_schema, vocab,
                         # files {relpath: {sha256, bytes}}, stages {name: meta}, snapshot
        retrieval/... coarse/... fine/... features/...

The server only ever opens a bundle through `Bundle.open`, which verifies every listed file
(size and sha256) and resolves each relative path inside the bundle: no absolute paths, no
`..`, no symlink that leads outside. Beyond the checksums (which catch truncation and bit
flips against an honest manifest), each file type gets a structural check that needs no trust
in the manifest: `.npy` headers (no object dtype, size consistent with the shape) and ONNX
external-data references (inside the bundle and listed in the manifest). Nothing here
unpickles anything.

Publishing is atomic: `publish` copies a finished bundle into a hidden staging directory,
verifies it, renames it to its version name, and only then switches `current`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "current"
REQUIRED_KEYS = ("format_version", "version", "created", "configs", "feature_schema", "vocab", "files", "stages")

# The feature-store snapshot (written by recstack.pipeline.export, read by recstack.serving.loading).
# Raw 0-based ids; `user_id` / `item_id` columns are dense 0..n-1 in order.
SNAPSHOT_USERS = "features/users.parquet"  # user_id, age_bucket, gender, activity
SNAPSHOT_ITEMS = "features/items.parquet"  # item_id, category, shop, brand, price_bucket, price
# user_id, seconds_ago (relative to the snapshot time), item_id, kind (0 click, 1 purchase),
# dwell; sorted by user_id then seconds_ago ascending (newest first), at most 50 per user.
SNAPSHOT_BEHAVIOURS = "features/behaviours.parquet"

MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; refuse to parse a huge one
SIGNATURE = "signature"  # manifest key: {"alg": "hmac-sha256", "value": hex digest}
SIGNATURE_ALG = "hmac-sha256"

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20


class BundleError(RuntimeError):
    """A bundle that is missing, malformed, or fails its checks; the message names the file."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_version_name(name: str) -> str:
    """A version is one plain path component (it names a directory under the artifacts root)."""
    if not isinstance(name, str) or not _VERSION_RE.match(name) or name in (".", ".."):
        raise BundleError(f"invalid bundle version name {name!r}: expected letters, digits, '.', '_' or '-'")
    return name


def check_relpath(relpath: str) -> PurePosixPath:
    """Validate a manifest path lexically: relative, POSIX separators, no `..`, no empty parts."""
    if not isinstance(relpath, str) or not relpath:
        raise BundleError(f"invalid bundle path {relpath!r}: empty")
    if "\\" in relpath or "\x00" in relpath:
        raise BundleError(f"invalid bundle path {relpath!r}: backslash or NUL")
    p = PurePosixPath(relpath)
    if p.is_absolute() or re.match(r"^[A-Za-z]:", relpath):
        raise BundleError(f"invalid bundle path {relpath!r}: absolute paths are not allowed")
    if any(part in ("..", ".", "") for part in relpath.split("/")):
        raise BundleError(f"invalid bundle path {relpath!r}: '..', '.' and empty components are not allowed")
    return p


def safe_path(root: str | Path, relpath: str) -> Path:
    """`root / relpath`, refusing anything that resolves (symlinks followed) outside `root`."""
    check_relpath(relpath)
    root_real = Path(root).resolve()
    target = (root_real / relpath).resolve()
    if target != root_real and root_real not in target.parents:
        raise BundleError(f"bundle path {relpath!r} resolves outside the bundle ({target})")
    return target


def file_entry(path: str | Path) -> dict:
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def new_version(now: _dt.datetime | None = None) -> str:
    """A version name from the UTC time, e.g. v20261128-121500 (callers make it unique)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("v%Y%m%d-%H%M%S")


def _utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(
    bundle_dir: str | Path,
    *,
    version: str,
    files: Iterable[str],
    configs: dict[str, Any],
    feature_schema: dict[str, Any],
    vocab: dict[str, Any],
    stages: dict[str, Any],
    extra: dict[str, Any] | None = None, created: str | None = None, signing_key: bytes | None = None,
) -> dict:
    """Checksum `files` (paths relative to `bundle_dir`) and write manifest.json atomically;
    with `signing_key`, the manifest carries its HMAC (see `sign_manifest`)."""
    bundle_dir = Path(bundle_dir)
    check_version_name(version)
    entries = {}
    for rel in sorted(set(files)):
        path = safe_path(bundle_dir, rel)
        if rel == MANIFEST:
            raise BundleError(f"{MANIFEST} cannot list itself")
        if not path.is_file():
            raise BundleError(f"bundle file {rel!r} does not exist in {bundle_dir}")
        entries[rel] = file_entry(path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created": created or _utc_now_iso(),
        "configs": configs,
        "feature_schema": feature_schema,
        "vocab": vocab,
        "files": entries,
        "stages": stages,
        **(extra or {}),
    }
    if signing_key is not None:
        manifest[SIGNATURE] = sign_manifest(manifest, signing_key)
    _atomic_write_text(bundle_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(bundle_dir: str | Path) -> dict:
    """Parse manifest.json and check its shape (not the files: see `verify_bundle`)."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} does not exist (not a bundle directory?)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: cannot parse: {e}") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path}: missing keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {manifest['format_version']!r}, this code reads {FORMAT_VERSION}")
    if not isinstance(manifest["files"], dict):
        raise BundleError(f"{path}: 'files' must be an object")
    version = manifest["version"]
    if not isinstance(version, str) or not version:
        raise BundleError(f"{path}: 'version' must be a non-empty string, got {version!r}")
    try:
        check_version_name(version)
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None
    return manifest


def _signed_bytes(manifest: dict) -> bytes:
    """The manifest without its signature, canonically serialised: what the HMAC covers."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_manifest(manifest: dict, key: bytes) -> dict:
    """The signature entry of `manifest`: HMAC-SHA256 with `key` over everything else in it,
    file checksums included, so the signature vouches for every file."""
    if not key:
        raise BundleError("the bundle signing key is empty")
    return {"alg": SIGNATURE_ALG, "value": hmac.new(key, _signed_bytes(manifest), hashlib.sha256).hexdigest()}


def check_signature(manifest: dict, key: bytes | None, where: str | Path) -> None:
    """With a key configured, the manifest must carry a valid HMAC from that key: a bundle whose
    files and checksums were both rewritten (which the checksums alone cannot catch) is refused.
    Without a key, nothing is checked."""
    if key is None:
        return
    sig = manifest.get(SIGNATURE)
    if not isinstance(sig, dict) or sig.get("alg") != SIGNATURE_ALG or not isinstance(sig.get("value"), str):
        raise BundleError(f"{where}: the manifest is not signed ({SIGNATURE_ALG}), and this server requires "
                          "signed bundles")
    if not hmac.compare_digest(sig["value"], sign_manifest(manifest, key)["value"]):
        raise BundleError(f"{where}: the manifest's signature does not match (changed after signing, or signed "
                          "with another key)")


def verify_bundle(bundle_dir: str | Path, key: bytes | None = None) -> dict:
    """Read the manifest, check its signature when a `key` is given, and check every listed
    file: path inside the bundle, a regular file, size, sha256, then a structural check by type
    (`check_file`); returns the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    check_signature(manifest, key, bundle_dir / MANIFEST)
    for rel, entry in manifest["files"].items():
        path = safe_path(bundle_dir, rel)
        if not isinstance(entry, dict) or not {"sha256", "bytes"} <= set(entry):
            raise BundleError(f"bundle file {rel!r}: manifest entry needs sha256 and bytes")
        if not path.is_file():
            raise BundleError(f"bundle file {rel!r} is missing from {bundle_dir} (or is not a regular file)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"bundle file {rel!r}: size {size} bytes, manifest says {entry['bytes']}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleError(f"bundle file {rel!r}: sha256 mismatch (file {digest[:12]}..., manifest {str(entry['sha256'])[:12]}...)")
    for rel in manifest["files"]:
        check_file(bundle_dir, rel, manifest["files"])
    return manifest


def check_file(bundle_dir: str | Path, rel: str, listed: dict | None = None) -> None:
    """Structural checks that do not trust the manifest's checksums (a forged manifest matches
    any content): `.npy` headers and ONNX external-data references; then that every model
    weight is finite (an honest export of a diverged model is NaN throughout, checksums and
    all). Raises BundleError naming `rel`."""
    path = safe_path(bundle_dir, rel)
    if rel.endswith(".npy"):
        shape, _ = check_npy(path, rel)
        check_npy_finite(path, rel, shape)
    elif rel.endswith(".onnx"):
        model = _load_onnx(bundle_dir, rel)
        _check_onnx_refs(model, bundle_dir, rel, listed)
        check_onnx_finite(model, bundle_dir, rel)


def check_npy(path: str | Path, rel: str) -> tuple[tuple[int, ...], str]:
    """An .npy file whose header parses, whose dtype holds no Python objects (nothing to unpickle),
    and whose size matches its shape exactly (truncated or padded files are refused)."""
    import numpy as np

    path = Path(path)
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif major in (2, 3):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {major}")
            offset = f.tell()
    except Exception as e:  # a damaged header fails in numpy's parser with ValueError, SyntaxError, TokenError, ...
        raise BundleError(f"bundle file {rel!r}: not a valid .npy file: {type(e).__name__}: {str(e)[:200]}") from None
    if dtype.hasobject:
        raise BundleError(f"bundle file {rel!r}: dtype {dtype} holds Python objects (would need unpickling); refused")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise BundleError(f"bundle file {rel!r}: {size} bytes, but its header ({dtype}, shape {tuple(shape)}) needs {expected}")
    return tuple(shape), str(dtype)


_FINITE_CHUNK = 1 << 22  # values per pass: bounds the temporary mask, whatever the file's size


def count_non_finite(values) -> int:
    """How many values of the array are NaN or infinite (counted in chunks)."""
    import numpy as np

    flat = values.reshape(-1, order="A")
    return sum(int(np.count_nonzero(~np.isfinite(flat[s : s + _FINITE_CHUNK])))
               for s in range(0, flat.size, _FINITE_CHUNK))


def check_npy_finite(path: str | Path, rel: str, shape: tuple[int, ...] | None = None) -> None:
    """Refuse a floating-point .npy holding NaN or infinity (read memory-mapped, in chunks).
    Call after `check_npy` (which vouches for the header and the size)."""
    import numpy as np

    if shape is not None and int(np.prod(shape, dtype=np.int64)) == 0:
        return  # nothing to read (and an empty file cannot be memory-mapped)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # a header numpy's loader refuses although it parsed (e.g. an unknown minor version)
        raise BundleError(f"bundle file {rel!r}: not a valid .npy file: {type(e).__name__}: {str(e)[:200]}") from None
    if arr.dtype.kind not in "fc":
        return
    bad = count_non_finite(arr)
    del arr
    if bad:
        raise BundleError(f"bundle file {rel!r}: {bad} NaN or infinite values; a model file must be finite "
                          "(did training diverge?)")


def _onnx_tensors(graph) -> Iterable:
    """Every TensorProto in an ONNX graph, subgraphs (If/Loop/Scan bodies) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _onnx_tensors(attr.g)
            for g in attr.graphs:
                yield from _onnx_tensors(g)


def _load_onnx(bundle_dir: str | Path, rel: str):
    """Parse an ONNX file's protobuf, without its external data (not yet checked)."""
    import onnx

    path = safe_path(bundle_dir, rel)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others on a damaged protobuf
        raise BundleError(f"bundle file {rel!r}: not a valid ONNX model: {str(e)[:200]}") from None
    if not model.HasField("graph") or not model.graph.node:
        raise BundleError(f"bundle file {rel!r}: not a valid ONNX model (no graph)")
    return model


def check_onnx_external_data(bundle_dir: str | Path, rel: str, listed: dict | None = None) -> list[str]:
    """Refuse an ONNX model whose tensors point at external data outside the bundle (`..`,
    absolute paths, symlinks out) or at a file the manifest does not list (so unverified).
    Returns the external files it references, as bundle paths."""
    return _check_onnx_refs(_load_onnx(bundle_dir, rel), bundle_dir, rel, listed)


def _check_onnx_refs(model, bundle_dir: str | Path, rel: str, listed: dict | None) -> list[str]:
    import onnx

    model_dir = PurePosixPath(rel).parent
    refs: list[str] = []
    for tensor in _onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((kv.value for kv in tensor.external_data if kv.key == "location"), "")
        try:
            check_relpath(location)
        except BundleError as e:
            raise BundleError(f"bundle file {rel!r}: tensor {tensor.name!r} has external data {location!r} "
                              f"that leaves the bundle: {e}") from None
        ref = (model_dir / location).as_posix() if str(model_dir) != "." else location
        safe_path(bundle_dir, ref)  # symlinks out
        if listed is not None and ref not in listed:
            raise BundleError(f"bundle file {rel!r}: tensor {tensor.name!r} has external data {ref!r}, "
                              "which the manifest does not list (unverified)")
        refs.append(ref)
    return refs


def check_onnx_finite(model, bundle_dir: str | Path, rel: str) -> None:
    """Refuse an ONNX model with a NaN or infinite weight (initializers, constants, subgraphs).
    External data is read from inside the bundle: call after `_check_onnx_refs`."""
    import onnx
    from onnx import numpy_helper

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    base = safe_path(bundle_dir, rel).parent
    for tensor in _onnx_tensors(model.graph):
        if tensor.data_type not in floats:
            continue
        try:
            values = numpy_helper.to_array(tensor, base_dir=str(base))
        except Exception as e:  # external data shorter than declared, a malformed tensor, ...
            raise BundleError(f"bundle file {rel!r}: tensor {tensor.name!r} cannot be read: {str(e)[:200]}") from None
        bad = count_non_finite(values.astype("float32", copy=False))
        if bad:
            raise BundleError(f"bundle file {rel!r}: tensor {tensor.name!r} has {bad} NaN or infinite values; "
                              "a model file must be finite (did training diverge?)")


def read_current(artifacts_root: str | Path) -> str:
    path = Path(artifacts_root) / CURRENT
    try:
        name = path.read_text().strip()
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e}") from e
    return check_version_name(name)


def write_current(artifacts_root: str | Path, version: str) -> Path:
    """Point `current` at `version` atomically (tmp file + rename): readers see old or new, never half."""
    root = Path(artifacts_root)
    check_version_name(version)
    if not (root / version / MANIFEST).is_file():
        raise BundleError(f"{root / version} is not a bundle (no {MANIFEST}); refusing to point {CURRENT} at it")
    _atomic_write_text(root / CURRENT, version + "\n")
    return root / CURRENT


def publish(bundle_dir: str | Path, artifacts_root: str | Path, version: str | None = None,
            switch_current: bool = True) -> Path:
    """Publish a finished bundle into `artifacts_root` atomically: copy it into a hidden staging
    directory, verify it there, rename it to `<version>` (never over an existing one), and only
    then point `current` at it. A crash at any step leaves `current` naming a complete bundle.
    `version` defaults to the manifest's; a different name is refused (responses name the
    manifest's version). Returns the published directory."""
    import shutil

    src, root = Path(bundle_dir), Path(artifacts_root)
    manifest = verify_bundle(src)
    version = check_version_name(version or manifest["version"])
    if version != manifest["version"]:
        raise BundleError(f"{src}: manifest version {manifest['version']!r} differs from the requested {version!r}")
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise BundleError(f"bundle version {version!r} already exists in {root}; versions are immutable")
    staging = root / f".staging-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(src, staging, symlinks=False)
        verify_bundle(staging)
        os.rename(staging, final)  # atomic on one filesystem; fails if the name was taken meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if switch_current:
        write_current(root, version)
    return final.resolve()


def resolve_bundle(path: str | Path) -> Path:
    """A bundle directory, or an artifacts root whose `current` names one -> the bundle directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path.resolve()
    if (path / CURRENT).is_file():
        version = read_current(path)
        bundle = safe_path(path, version)
        if not (bundle / MANIFEST).is_file():
            raise BundleError(f"{path / CURRENT} points at {version!r}, which is not a bundle directory")
        return bundle
    if not path.exists():
        raise BundleError(f"{path} does not exist")
    raise BundleError(f"{path} is neither a bundle (no {MANIFEST}) nor an artifacts root (no {CURRENT} file)")


class Bundle:
    """A verified bundle: its directory, manifest, and safe access to its files."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, key: bytes | None = None) -> "Bundle":
        """Open the bundle at `path` (a bundle directory or an artifacts root). Its manifest's
        version must name its directory, as `publish` requires: every response carries the
        version, and a reload by version finds the bundle by that name. With `key`, the
        manifest must be signed with it (`check_signature`)."""
        root = resolve_bundle(path)
        manifest = verify_bundle(root, key) if verify else read_manifest(root)
        if manifest["version"] != root.name:
            raise BundleError(f"{root / MANIFEST}: version {manifest['version']!r} differs from the bundle's "
                              f"directory name {root.name!r}")
        return cls(root, manifest)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def path(self, relpath: str) -> Path:
        """A listed file's path; a file the manifest does not list (and so did not verify) is refused."""
        if relpath not in self.manifest["files"]:
            raise BundleError(f"bundle {self.root} does not list {relpath!r} in its manifest")
        return safe_path(self.root, relpath)

    def stage(self, name: str) -> dict:
        try:
            return self.manifest["stages"][name]
        except KeyError:
            raise BundleError(f"bundle {self.root}: manifest has no stage {name!r}") from None
