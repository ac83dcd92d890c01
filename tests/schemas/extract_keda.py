"""Vendor KEDA's CRD schemas the Kubernetes manifest tests validate against.

Run by hand to refresh ``tests/schemas/keda-*.json`` (tests never read KEDA's repository)::

    git clone https://github.com/kedacore/keda && git -C keda checkout v2.20.2
    python tests/schemas/extract_keda.py keda --source "kedacore/keda v2.20.2 at commit <sha>"

KEDA (Apache-2.0) generates its CustomResourceDefinitions into ``config/crd/bases/``. Each
one's ``openAPIV3Schema`` for its latest served version is written unchanged, as JSON:
what the API server validates a ScaledObject or TriggerAuthentication with.
``tests/schemas/keda.SOURCE`` records where it came from.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
#: CRD file in KEDA's repository -> the file written here.
CRDS = {
    "config/crd/bases/keda.sh_scaledobjects.yaml": "keda-scaledobject.json",
    "config/crd/bases/keda.sh_triggerauthentications.yaml": "keda-triggerauthentication.json",
}


def latest_served(crd: dict[str, Any]) -> dict[str, Any]:
    """The served version of a CRD that sorts last by Kubernetes' version order (v1 > v1beta2 > v1alpha1)."""

    def rank(name: str) -> tuple[int, int, int]:
        match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", name)
        if match is None:
            raise ValueError(f"not a Kubernetes API version: {name}")
        major, stage, minor = match.groups()
        return int(major), {"alpha": 0, "beta": 1, None: 2}[stage], int(minor or 0)

    served = [v for v in crd["spec"]["versions"] if v.get("served")]
    return max(served, key=lambda v: rank(v["name"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("keda", type=Path, help="a checkout of github.com/kedacore/keda")
    p.add_argument("--source", required=True, help="first line of keda.SOURCE: repository, tag and commit")
    args = p.parse_args(argv)
    lines = [args.source, "Upstream: https://github.com/kedacore/keda (Apache License 2.0, Copyright The KEDA Authors)"]
    for crd_path, out in CRDS.items():
        crd = yaml.safe_load((args.keda / crd_path).read_text())
        version = latest_served(crd)
        (HERE / out).write_text(json.dumps(version["schema"]["openAPIV3Schema"], indent=1) + "\n")
        lines.append(f"{out}: {crd_path}, version {version['name']} (served, storage={version.get('storage')}), "
                     "spec.versions[].schema.openAPIV3Schema unchanged")
    lines.append("Regenerate: python tests/schemas/extract_keda.py <keda checkout> --source \"...\"")
    (HERE / "keda.SOURCE").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
