"""A Kubeflow Pipelines (v2) pipeline of one federation: an aggregator task and N client tasks.

Every task runs a ``fedq`` command in the fedq image against the Redis named by the pipeline's
``redis_url`` parameter (host and port, no credentials): the password comes from the Kubernetes
Secret ``fedq-redis`` (key ``password``), which kfp-kubernetes mounts into every task, and fedq
reads it from the file (FEDQ_REDIS_PASSWORD_FILE), so that it is never a pipeline parameter or an
argument of any process. The run id is the pipeline run's own id, so each pipeline run is a new
federation. A last task writes the run's report (report.json, model.keras) as an artifact and
returns the final test accuracy and loss as pipeline outputs. Needs the optional ``kfp`` package
and ``kfp-kubernetes`` (``pip install 'fedq[kfp]'``); nothing else in fedq imports this module.
"""

# No `from __future__ import annotations`: kfp reads the component signatures' real types.
from pathlib import Path
from typing import Any, NamedTuple

from kfp import compiler, dsl, kubernetes

PIPELINE_NAME = "fedq-federation"
# The Redis password: a Secret of the pipeline's namespace, mounted as a file into every task.
REDIS_SECRET = "fedq-redis"
SECRET_DIR = "/etc/fedq/redis-auth"


def _with_redis_secret(task: Any, secret: str) -> Any:
    """The task reads the Redis password from the Secret's mounted file; no caching (each run is new)."""
    kubernetes.use_secret_as_volume(task, secret_name=secret, mount_path=SECRET_DIR, optional=False)
    task.set_env_variable("FEDQ_REDIS_PASSWORD_FILE", f"{SECRET_DIR}/password")
    task.set_env_variable("HOME", "/tmp")
    return task.set_caching_options(False)

# Writes the report, then the two final metrics as the task's output parameters.
_REPORT_SCRIPT = """set -e
fedq --redis-url "$1" report --run "$2" --out "$3"
mkdir -p "$(dirname "$4")" "$(dirname "$5")"
python -c 'import json, sys
final = json.load(open(sys.argv[1]))["final"]
open(sys.argv[2], "w").write(repr(float(final["test_accuracy"])))
open(sys.argv[3], "w").write(repr(float(final["test_loss"])))' "$3/report.json" "$4" "$5"
"""


def _components(image: str) -> tuple[Any, Any, Any]:
    """The three container components, each running the fedq image."""

    @dsl.container_component
    def fedq_aggregator(redis_url: str, run_id: str, clients: int, rounds: int, local_epochs: int) -> dsl.ContainerSpec:
        """Create the run and drive it to its end (fedq aggregator --clients ... then exit)."""
        return dsl.ContainerSpec(image=image, command=["fedq"], args=[
            "--redis-url", redis_url, "aggregator", "--clients", clients, "--rounds", rounds,
            "--local-epochs", local_epochs, "--run-id", run_id])

    @dsl.container_component
    def fedq_client(redis_url: str, run_id: str, shard: int) -> dsl.ContainerSpec:
        """One client: train shard `shard` in every round of the run, then leave."""
        return dsl.ContainerSpec(image=image, command=["fedq"], args=[
            "--redis-url", redis_url, "client", "--shard", shard, "--run", run_id, "--once"])

    # kfp's documented way to declare an output parameter of a container component is a call,
    # dsl.OutputPath(float), in the annotation (kfp reads it at runtime); no static type says that.
    @dsl.container_component
    def fedq_report(redis_url: str, run_id: str, report: dsl.Output[dsl.Artifact],
                    test_accuracy: dsl.OutputPath(float),  # type: ignore[valid-type]
                    test_loss: dsl.OutputPath(float),  # type: ignore[valid-type]
                    ) -> dsl.ContainerSpec:
        """The run's report.json and model.keras, and its final test metrics."""
        return dsl.ContainerSpec(image=image, command=["sh", "-c", _REPORT_SCRIPT, "fedq-report"],
                                 args=[redis_url, run_id, report.path, test_accuracy, test_loss])

    return fedq_aggregator, fedq_client, fedq_report


def build_pipeline(clients: int, rounds: int, local_epochs: int, image: str, secret: str = REDIS_SECRET) -> Any:
    """The pipeline function for N = clients client tasks (a pipeline's task count is fixed)."""
    aggregator_op, client_op, report_op = _components(image)

    class Outputs(NamedTuple):
        test_accuracy: float
        test_loss: float
        report: dsl.Artifact

    @dsl.pipeline(name=PIPELINE_NAME,
                  description=f"fedq: federated training with {clients} clients over Redis")
    def federation(redis_url: str, rounds: int = rounds, local_epochs: int = local_epochs) -> Outputs:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        agg = aggregator_op(redis_url=redis_url, run_id=run_id, clients=clients, rounds=rounds,
                            local_epochs=local_epochs)
        _with_redis_secret(agg.set_display_name("aggregator"), secret)
        client_tasks = []
        for k in range(clients):
            task = client_op(redis_url=redis_url, run_id=run_id, shard=k)
            _with_redis_secret(task.set_display_name(f"client-{k}"), secret)
            client_tasks.append(task)
        rep = report_op(redis_url=redis_url, run_id=run_id).after(agg, *client_tasks)
        _with_redis_secret(rep.set_display_name("report"), secret)
        return Outputs(test_accuracy=rep.outputs["test_accuracy"], test_loss=rep.outputs["test_loss"],
                       report=rep.outputs["report"])

    return federation


def compile_pipeline(clients: int, rounds: int, local_epochs: int, image: str, output: Path,
                     secret: str = REDIS_SECRET) -> Path:
    """Compile the pipeline to a KFP v2 YAML file (offline: nothing is contacted)."""
    compiler.Compiler().compile(build_pipeline(clients, rounds, local_epochs, image, secret), str(output))
    return output
