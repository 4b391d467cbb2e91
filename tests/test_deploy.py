"""The deployment files, checked offline against their schemas and against the code.

- Dockerfile: parsed with dockerfile-parse; its structure (targets, user, healthcheck, pins).
- deploy/compose.yaml: the Compose Specification's JSON schema as check-jsonschema vendors it.
- deploy/kubernetes/: Kubernetes' own OpenAPI schemas, strict, as kubernetes-validate bundles
  them for the oldest and newest versions we claim.
- KEDA's ScaledObject and TriggerAuthentication: tests/schemas/keda-v1alpha1.schema.json, a
  schema written for these tests from KEDA's documentation (KEDA's CRD is not at hand offline).
- Against the code: every IMAGEGATE_ name is a setting and every value parses; the KEDA query
  runs on the real, migrated `tasks` table of PostgreSQL and counts the right rows.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import tomllib
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from imagegate.config import Settings
from imagegate.providers import registry

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-v1alpha1.schema.json"
IMAGE_UID = 10001  # the Dockerfile's user, which runAsUser names
NAME = re.compile(r"\bIMAGEGATE_[A-Z0-9_]*[A-Z0-9]\b")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object in deploy/kubernetes/, the Secret template included."""
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [(f"{path.name}: {doc['kind']}", doc) for doc in documents(path)]
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def compose() -> dict[str, Any]:
    return documents(DEPLOY / "compose.yaml")[0]


# --- schemas ---------------------------------------------------------------------------------


def compose_errors(spec: dict[str, Any]) -> list[str]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    validator = jsonschema.Draft202012Validator(json.loads(vendored.read_text()))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(spec)]


def test_compose_file_follows_the_compose_specification() -> None:
    assert compose_errors(compose()) == []


@pytest.mark.parametrize(
    ("service", "key", "value"),
    [
        ("worker", "stop_grace_periods", "6m"),  # a misspelt key
        ("gateway-1", "depends_on", {"migrate": {"condition": "service_done"}}),
        ("worker", "deploy", {"resources": {"reservations": {"devices": "nvidia"}}}),
    ],
)
def test_a_broken_compose_file_is_refused(service: str, key: str, value: Any) -> None:
    spec = copy.deepcopy(compose())
    spec["services"][service][key] = value
    assert compose_errors(spec)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_follow_kubernetes_schemas(version: str) -> None:
    checked = 0
    for where, doc in manifests():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc}")
        checked += 1
    assert checked >= 7


def mutated(doc: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    """A copy of `doc` with the value at `path` replaced (None: removed)."""
    bad = copy.deepcopy(doc)
    *parents, last = path
    node = bad
    for step in parents:
        node = node[step]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return bad


CONTAINER = ["spec", "template", "spec", "containers", 0]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["spec", "replicas"], "2"),
        ([*CONTAINER, "readinessProbe", "httpget"], {}),  # strict: no unknown fields
        ([*CONTAINER, "securityContext", "runAsNonRoot"], "yes"),
        (["spec", "selector"], None),
    ],
)
def test_a_broken_kubernetes_manifest_is_refused(path: list[Any], value: Any) -> None:
    (gateway,) = [d for d in of_kind("Deployment") if d["metadata"]["name"].endswith("gateway")]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(mutated(gateway, path, value), KUBERNETES_VERSIONS[-1], True)


def keda_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(json.loads(KEDA_SCHEMA.read_text()))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_keda_objects_follow_the_keda_schema() -> None:
    keda = [doc for _, doc in manifests() if doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in keda:
        assert keda_errors(doc) == [], doc["metadata"]["name"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["triggers", 0, "metadata", "targetQueryValue"], 4),  # KEDA wants strings
        (["triggers", 0, "metadata", "query"], None),
        (["minReplicas"], 1),  # the HPA's name for minReplicaCount
        (["scaleTargetRef"], {"kind": "Deployment"}),
    ],
)
def test_a_broken_scaled_object_is_refused(path: list[Any], value: Any) -> None:
    assert keda_errors(mutated(of_kind("ScaledObject")[0], ["spec", *path], value))


# --- agreement with the code -----------------------------------------------------------------


def known_variables() -> set[str]:
    """IMAGEGATE_ + each Settings field, and the providers' own key and URL variables."""
    names = {f"IMAGEGATE_{field.upper()}" for field in Settings.model_fields}
    for provider in registry.env_providers():
        names |= {v for v in (provider.key_variable, provider.base_url_variable) if v}
    return names


def deployment_texts() -> dict[str, str]:
    paths = [ROOT / "Dockerfile", ROOT / "docs" / "deploy.md", *DEPLOY.rglob("*")]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths if p.is_file()}


def test_every_imagegate_variable_named_is_a_setting() -> None:
    known = known_variables()
    unknown = {
        f"{where}: {name}"
        for where, text in deployment_texts().items()
        for name in NAME.findall(text)
        if name not in known
    }
    assert not unknown, f"not settings of imagegate.config.Settings: {sorted(unknown)}"


def settings_from(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [n for n in os.environ if n.startswith("IMAGEGATE_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    settings.check_hosts()  # prod: the links' host is not the client's choice
    settings.signing_key()  # prod: set explicitly
    return settings


def interpolated(value: str) -> str:
    """A compose value with `${X:?...}` filled in as a filled-in .env would, `${X:-default}`
    with its default."""

    def fill(found: re.Match[str]) -> str:
        return found[3] if found[2] == "-" else f"value-of-{found[1].lower()}"

    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", fill, value)


def test_compose_settings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = compose()["x-imagegate-environment"]
    settings = settings_from({k: interpolated(str(v)) for k, v in environment.items()}, monkeypatch)
    assert settings.env == "prod"
    assert settings.database_url and settings.database_url.startswith("postgresql+asyncpg://")
    assert not settings.auto_migrate and not settings.bootstrap_admin


def test_kubernetes_settings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = dict(of_kind("ConfigMap")[0]["data"])
    secret = next(s for s in of_kind("Secret") if s["metadata"]["name"] == "imagegate")
    environment |= secret["stringData"]
    settings = settings_from(environment, monkeypatch)
    assert settings.env == "prod" and not settings.auto_migrate


def test_every_compose_variable_is_in_the_env_example() -> None:
    used = set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose.yaml").read_text()))
    example = (DEPLOY / "env.example").read_text()
    listed = set(re.findall(r"^(\w+)=", example, re.MULTILINE))
    assert used <= listed, f"missing from deploy/env.example: {sorted(used - listed)}"
    secrets = {n for n in listed if re.search("SECRET|PASSWORD|TOKEN", n)}
    assert all(re.search(rf"^{n}=$", example, re.MULTILINE) for n in secrets), "no secret values"


def test_compose_wiring() -> None:
    services = compose()["services"]
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"migrate", "buckets"}
    for name, service in services.items():
        assert name in one_shot or "healthcheck" in service, name
        for needed, condition in service.get("depends_on", {}).items():
            wanted = "completed_successfully" if needed in one_shot else "healthy"
            assert condition["condition"] == f"service_{wanted}", (name, needed)
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for gateway in ("gateway-1", "gateway-2"):
        assert "migrate" in services[gateway]["depends_on"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    proxy = services["proxy"]
    assert set(proxy["depends_on"]) == {"gateway-1", "gateway-2"}
    caddyfile = (DEPLOY / "Caddyfile").read_text()
    assert "reverse_proxy gateway-1:8000 gateway-2:8000" in caddyfile


def duration(text: str) -> timedelta:
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, f"not a duration this test reads: {text!r}"
    return timedelta(minutes=int(parts[1] or 0), seconds=int(parts[2] or 0))


def drain_seconds(environment: dict[str, str]) -> float:
    default = Settings.model_fields["worker_drain_seconds"].default
    return float(environment.get("IMAGEGATE_WORKER_DRAIN_SECONDS", default))


def test_shutdown_waits_out_a_drain_and_a_request() -> None:
    """SIGTERM drains a worker (for up to its drain time) and lets a gateway finish its
    requests (each at most the request timeout): the grace periods outlast both."""
    margin = 10
    worker = compose()["services"]["worker"]
    grace = duration(worker["stop_grace_period"]).total_seconds()
    assert grace >= drain_seconds(worker["environment"]) + margin
    longest = Settings.model_fields["request_timeout_seconds"].default
    for deployment in of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        if container["name"] == "worker":
            environment = {e["name"]: e["value"] for e in container.get("env", [])}
            needed = drain_seconds(environment)
        else:
            needed = longest
        assert pod["terminationGracePeriodSeconds"] >= needed + margin, container["name"]


def test_a_workers_torch_threads_are_the_cpus_its_pod_asks_for() -> None:
    """A pod sees every core of its node; torch would start a thread for each of them."""
    workers = [
        container
        for deployment in of_kind("Deployment")
        for container in deployment["spec"]["template"]["spec"]["containers"]
        if container["name"] == "worker"
    ]
    assert workers
    for container in workers:
        environment = {e["name"]: e["value"] for e in container.get("env", [])}
        threads = environment.get("IMAGEGATE_TORCH_THREADS")
        assert threads == container["resources"]["requests"]["cpu"], container["name"]


def test_pods_run_unprivileged_without_a_namespace() -> None:
    for where, doc in manifests():
        assert "namespace" not in doc["metadata"], where
        pod = doc["spec"]["template"]["spec"] if doc["kind"] in {"Deployment", "Job"} else None
        if pod is None:
            continue
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID, where
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "memory" in container["resources"]["limits"], where


def test_kubernetes_objects_refer_to_each_other() -> None:
    listed = documents(KUBERNETES / "kustomization.yaml")[0]["resources"]
    assert all((KUBERNETES / name).is_file() for name in listed)
    # The Secrets are made by hand and the Job runs before a rollout (docs/deploy.md).
    not_listed = {p.name for p in KUBERNETES.glob("*.yaml")} - set(listed)
    assert not_listed == {"kustomization.yaml", "secret.example.yaml", "migrate-job.yaml"}
    secrets = {s["metadata"]["name"]: s["stringData"] for s in of_kind("Secret")}
    for auth in of_kind("TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]]
    hpa = of_kind("HorizontalPodAutoscaler")[0]
    gateway = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "imagegate-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def worker_scaling() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    return [(s, deployments[s["spec"]["scaleTargetRef"]["name"]]) for s in of_kind("ScaledObject")]


def test_each_models_workers_scale_on_that_models_jobs() -> None:
    auths = {a["metadata"]["name"] for a in of_kind("TriggerAuthentication")}
    assert worker_scaling()
    for scaled, deployment in worker_scaling():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        args = container["args"]
        model = args[args.index("--models") + 1]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "postgresql"
        assert trigger["authenticationRef"]["name"] in auths
        assert f"model = '{model}'" in trigger["metadata"]["query"]


def test_the_docs_show_the_query_keda_runs() -> None:
    query = of_kind("ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["query"]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert " ".join(query.split()) in " ".join(docs.split())


@pytest.mark.postgres
async def test_the_keda_query_counts_a_models_waiting_and_running_jobs() -> None:
    """On the real, migrated schema: what KEDA would read for the demo model's workers."""
    import asyncpg

    from tests.conftest import PG_ADMIN_DSN, create_pg_database, drop_pg_database

    name = await create_pg_database()
    try:
        dsn = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"  # KEDA's libpq form
        await queue_jobs(dsn.replace("postgresql://", "postgresql+asyncpg://"))
        connection = await asyncpg.connect(dsn)
        try:
            query = of_kind("ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["query"]
            assert await connection.fetchval(query) == 3
        finally:
            await connection.close()
    finally:
        await drop_pg_database(name)


async def queue_jobs(url: str) -> None:
    """Rows of every state for the demo model (a synchronous request's job among them) and
    one for another model: those waiting now (2) and running (1) count; finished ones, later
    ones and other models' do not."""
    from sqlalchemy import update

    from imagegate.store.db import create_engine, session_factory, upgrade
    from imagegate.store.models import Task, utcnow
    from imagegate.store.tasks import NewTask, create_task

    await upgrade(url)
    states: list[tuple[str, dict[str, Any]]] = [
        ("imagegate-demo", {"kind": "job"}),
        ("imagegate-demo", {"run_after": utcnow() - timedelta(seconds=5)}),
        ("imagegate-demo", {"run_after": utcnow() + timedelta(minutes=5)}),
        ("imagegate-demo", {"status": "in_progress"}),
        *[("imagegate-demo", {"status": s}) for s in ("succeeded", "failed", "cancelled")],
        ("another-model", {}),
    ]
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session:
            for model, values in states:
                body = {"model": model, "prompt": "a red circle"}
                new = NewTask("key:1", 1, None, "v1", "v1.images.generations", model, body, "/")
                task, _ = await create_task(session, new)
                if values:
                    await session.execute(update(Task).where(Task.id == task.id).values(**values))
            await session.commit()
    finally:
        await engine.dispose()


# --- the Dockerfile --------------------------------------------------------------------------


def stages() -> dict[str, list[dict[str, str]]]:
    """The Dockerfile's instructions by stage name (comments left out)."""
    parser = DockerfileParser(fileobj=io.BytesIO((ROOT / "Dockerfile").read_bytes()))
    found: dict[str, list[dict[str, str]]] = {}
    current: list[dict[str, str]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            current = found.setdefault(instruction["value"].split()[-1], [])
        if instruction["instruction"] != "COMMENT":
            current.append(instruction)
    return found


def values(stage: list[dict[str, str]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_the_dockerfile_builds_a_gateway_and_a_worker_image() -> None:
    built = stages()
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    assert "ADD" not in {i["instruction"] for s in built.values() for i in s}
    for target, command in (("gateway", '["imagegate"]'), ("worker", '["imagegate", "worker"]')):
        stage = built[target]
        assert values(stage, "USER") == ["imagegate:imagegate"], target
        assert values(stage, "ENTRYPOINT") == [command], target
    gateway = built["gateway"]
    assert "/healthz" in values(gateway, "HEALTHCHECK")[0]
    assert "IMAGEGATE_LOCAL_EXECUTION=workers" in values(gateway, "ENV")[0]
    assert f"--uid {IMAGE_UID}" in values(built["base"], "RUN")[0]
    installs = {name: " ".join(values(built[name], "RUN")) for name in built}
    assert "torch" not in installs["gateway-env"] and "[local]" not in installs["gateway-env"]
    assert "[local]" in installs["worker-env"]


def test_the_worker_image_pins_the_projects_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [r for r in project["optional-dependencies"]["local"] if r.startswith("torch")]
    assert pin in " ".join(values(stages()["worker-env"], "RUN"))


def test_no_secret_in_the_image_or_its_context() -> None:
    for stage in stages().values():
        for line in values(stage, "ENV") + values(stage, "ARG"):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|_KEY\b", line), line
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") :][:4] == ["*", "!pyproject.toml", "!README.md", "!src/"]
