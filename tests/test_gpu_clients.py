"""The GPU path: deploy/overlays/gpu (rendered and checked offline; no GPU machine runs it in
these tests), and the devices each client trains on, recorded in report.json (hostile until checked).
"""

from __future__ import annotations

from typing import Any

import deploy_checks
import pytest
from deploy_harness import DEPLOY, KUBECTL, kustomize

from fedq import __version__
from fedq.roles.report import MAX_DEVICES, client_devices


@pytest.mark.parametrize("value, expected", [
    (["CPU:0", "GPU:0"], ["CPU:0", "GPU:0"]),
    ([], []),
    (None, None),
    ("GPU:0", None),
    ([1, 2], None),
    (["GPU:0", ""], None),
    (["x" * 129], None),
    (["GPU:0\x1b[2J"], None),
    (["CPU:0"] * (MAX_DEVICES + 1), None),
])
def test_a_clients_devices_are_checked_before_the_report_takes_them(value: Any, expected: Any) -> None:
    assert client_devices(value) == expected


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the kustomize overlays)")
def test_the_gpu_overlay_gives_each_client_pod_one_gpu_on_a_gpu_node() -> None:
    docs = kustomize(DEPLOY / "overlays" / "gpu")
    assert deploy_checks.problems(docs) == []
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    pod = jobs["fedq-clients"]["spec"]["template"]["spec"]
    client = pod["containers"][0]
    assert client["image"] == f"fedq:{__version__}-gpu" and deploy_checks.is_fedq_image(client["image"])
    assert client["resources"]["limits"]["nvidia.com/gpu"] == client["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "TF_FORCE_GPU_ALLOW_GROWTH", "value": "true"} in client["env"]
    assert client["args"][0] == "client" and client["securityContext"]["allowPrivilegeEscalation"] is False
    # Only the clients train: no other pod asks for a GPU or runs the GPU image.
    for d in docs:
        spec = deploy_checks.pod_spec(d)
        if spec is None or d is jobs["fedq-clients"]:
            continue
        for c in spec["containers"]:
            assert "nvidia.com/gpu" not in (c.get("resources", {}).get("limits") or {}), deploy_checks.kn(d)
            assert not c["image"].endswith("-gpu"), deploy_checks.kn(d)
