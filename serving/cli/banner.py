"""Example requests printed by ``fermion serve``: a curl and a Python snippet that work."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from model_store.manifest import SAMPLES_FILE, V2_DATATYPES, ModelManifest
from model_store.store import ModelStore, StoreError
from serving.inference.repository import ModelRepository, VersionState

__all__ = ["example_request", "start_banner", "usage_text"]


def example_request(store: ModelStore, manifest: ModelManifest) -> tuple[dict[str, Any], Any]:
    """A one-row V2 JSON request for ``manifest``, from its published samples when it has some.

    Returns the request and the sample's label (None when unknown).
    """
    samples: dict[str, np.ndarray] = {}
    label = None
    entry = next((f for f in manifest.files if f.file == SAMPLES_FILE), None)
    if entry is not None:
        try:
            with np.load(store.artifact_path(manifest, entry), allow_pickle=False) as npz:
                samples = {k: npz[k][:1] for k in npz.files}
        except (OSError, ValueError, StoreError):
            samples = {}
        if "labels" in samples:
            label = samples["labels"].reshape(-1)[0].item()
    inputs = []
    for spec in manifest.inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        arr = samples.get(spec.name)
        if arr is None or list(arr.shape) != shape:
            dtype = V2_DATATYPES[spec.datatype].numpy
            arr = np.zeros(shape, dtype=object if spec.datatype == "BYTES" else dtype)
        data = [x.decode() if isinstance(x, bytes) else x for x in arr.reshape(-1).tolist()]
        inputs.append({"name": spec.name, "shape": shape, "datatype": spec.datatype, "data": data})
    return {"inputs": inputs}, label


def usage_text(
    store: ModelStore, manifest: ModelManifest, base_url: str, *, api_key: str | None = None
) -> str:
    """Write an example body to a temp file and return curl + Python examples using it.

    With ``api_key`` the examples send it as a bearer token, and the text shows it.
    """
    request, label = example_request(store, manifest)
    folder = Path(tempfile.gettempdir()) / "fermion-examples"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{manifest.name}.json"
    path.write_bytes(orjson.dumps(request))
    url = f"{base_url}/v2/models/{manifest.name}/infer"
    expect = f"  (its label: {label})" if label is not None else ""
    auth = key_line = py_auth = ""
    if api_key is not None:
        key_line = f"\n  API key (scopes infer:*, read; shown once): {api_key}\n"
        auth = f" -H 'Authorization: Bearer {api_key}'"
        py_auth = f', "Authorization": "Bearer {api_key}"'
    return f"""\
Fermion is ready at {base_url}   model {manifest.name}, version {manifest.version}
{key_line}
  curl -s{auth} {base_url}/v2/models/{manifest.name}
  curl -s -X POST {url}{auth} \\
       -H 'Content-Type: application/json' -d @{path}

  python3 - <<'PY'
import json, urllib.request
body = open("{path}", "rb").read()
req = urllib.request.Request("{url}", body, {{"Content-Type": "application/json"{py_auth}}})
out = json.load(urllib.request.urlopen(req))["outputs"][0]
print(out["name"], out["data"], "argmax:", out["data"].index(max(out["data"])))
PY
{expect}"""


def start_banner(repo: ModelRepository, base_url: str, *, api_key: str | None = None) -> str:
    """What ``fermion serve`` prints once the first load is done: only what is true.

    Ready: the examples for the first model's newest READY version. Not ready: that it
    is not, and why (the readiness reason), plus the examples when a version serves.
    """
    readiness = repo.readiness()
    serving = [
        sv
        for sv in sorted(repo.served(), key=lambda sv: (sv.name, -sv.version))
        if sv.state is VersionState.READY
    ]
    lines = []
    if not readiness.ready:
        lines.append(f"Fermion is up at {base_url} but NOT ready: {readiness.reason()}")
    if serving:
        text = usage_text(repo.store, serving[0].manifest, base_url, api_key=api_key)
        lines.append(text if readiness.ready else text.split("\n", 1)[1])
    if readiness.ready and readiness.problems:
        lines.append(f"  not serving: {readiness.reason()}")
    return "\n".join(lines)
