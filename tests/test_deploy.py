"""deploy/: every manifest parses, the embedded policy is valid, every metric the dashboard and the
alert rules name is one Fender exports, and promtool accepts the rules."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess

import httpx
from ruamel.yaml import YAML

from proxy.config import parse_policy
from tests.conftest import ROOT, policy_text
from tests.support.need import missing

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "fender-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "fender-dashboard.json"

# Metrics of policy modules developed on other branches (the issue that defines each). Once those are
# merged the names are served and this table can shrink; a referenced name must be served or listed here.
# Metrics named in deploy/ that a module not merged yet will export (empty: every module is in).
PENDING_MERGE: dict[str, str] = {}

_METRIC_RE = re.compile(r"\bfender_[a-z0-9_]+\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}


def yaml_documents(path) -> list:
    with open(path) as handle:
        return [doc for doc in YAML(typ="safe").load_all(handle) if doc is not None]


def test_every_yaml_manifest_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 4
    for path in files:
        docs = yaml_documents(path)
        assert docs, path
        if "kubernetes" in path.parts:
            for doc in docs:
                assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path


def test_kubernetes_sidecar_is_complete_and_its_policy_is_valid():
    docs = {d["kind"]: d for d in yaml_documents(DEPLOY / "kubernetes" / "sidecar.yaml")}
    policy = parse_policy(docs["ConfigMap"]["data"]["policy.yaml"], "sidecar.yaml ConfigMap")
    # Admin listens beyond loopback there, so a token source must be configured.
    assert policy.admin.host == "0.0.0.0" and policy.admin_auth is not None
    pod = docs["Deployment"]["spec"]["template"]
    fender = next(c for c in pod["spec"]["containers"] if c["name"] == "fender")
    assert fender["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert fender["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert fender["resources"]["requests"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > policy.drain.delay + policy.drain.timeout
    monitor = yaml_documents(DEPLOY / "kubernetes" / "servicemonitor.yaml")[0]
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= docs["Service"]["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in docs["Service"]["spec"]["ports"]}


def test_the_headless_service_example_gives_fender_every_pod_as_a_replica():
    docs = {d["kind"]: d for d in yaml_documents(DEPLOY / "kubernetes" / "headless-service.yaml")}
    service = docs["Service"]
    assert service["spec"]["clusterIP"] == "None"  # headless: the DNS answer lists the pods
    policy = parse_policy(docs["ConfigMap"]["data"]["policy.yaml"], "headless-service.yaml ConfigMap")
    (entry,) = policy.upstreams["catalog"].replicas
    meta = service["metadata"]
    assert entry.resolve and entry.host == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    assert entry.port in {p["port"] for p in service["spec"]["ports"]}
    assert policy.upstreams["catalog"].health_check is not None  # new pods are checked before traffic
    assert policy.dns.resolvers == ()  # the pod's resolv.conf: the cluster DNS


def test_kubernetes_tls_example_mounts_its_secrets_where_the_policy_reads_them():
    docs = {d["kind"]: d for d in yaml_documents(DEPLOY / "kubernetes" / "tls-sidecar.yaml")}
    policy = parse_policy(docs["ConfigMap"]["data"]["policy.yaml"], "tls-sidecar.yaml ConfigMap")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    fender = next(c for c in pod["containers"] if c["name"] == "fender")
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mounted = {m["mountPath"]: m["name"] for m in fender["volumeMounts"]}
    files = [policy.server.tls.cert_file, policy.server.tls.key_file]
    tls = policy.upstreams["payments"].tls
    files += [tls.ca_file, tls.cert_file, tls.key_file]
    for path in files:
        directory = path.rsplit("/", 1)[0]
        assert mounted.get(directory) in secrets, path  # every file comes from a mounted Secret
    assert policy.upstreams["payments"].replicas[0].tls


def test_the_redis_cluster_example_policy_is_valid():
    policy = parse_policy((DEPLOY / "redis" / "fleet-policy.yaml").read_text(), "fleet-policy.yaml")
    redis = policy.state.redis
    assert redis.mode == "cluster" and len(redis.nodes) == 3
    values = yaml_documents(DEPLOY / "redis" / "redis-cluster-values.yaml")[0]
    assert values["cluster"]["nodes"] == 6 and values["cluster"]["replicas"] == 1


def test_dockerfile_and_systemd_unit():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", dockerfile, re.M)
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((DEPLOY / "fender.service").read_text())
    assert "fender run" in unit["Service"]["ExecStart"]
    assert "-HUP" in unit["Service"]["ExecReload"]
    assert unit["Service"]["KillSignal"] == "SIGTERM"


def referenced_metrics() -> dict[str, set[str]]:
    rules = yaml_documents(RULES)[0]
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    queries += [a["expr"] for a in dashboard["annotations"]["list"]]
    return {
        "rules": {m for e in exprs for m in _METRIC_RE.findall(e)},
        "dashboard": {m for q in queries for m in _METRIC_RE.findall(q)},
    }


async def test_every_metric_named_in_rules_and_dashboard_is_served(echo_upstream, start_fender):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with httpx.AsyncClient() as client:
        exposition = (await client.get(fender.admin_url + "/metrics")).text
    served: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        served.add(name)
        served.update(name + suffix for suffix in _SUFFIXES.get(kind, ()))
    names = referenced_metrics()
    assert len(names["rules"]) >= 5 and len(names["dashboard"]) >= 10
    for where, found in names.items():
        unknown = sorted(found - served - set(PENDING_MERGE))
        assert unknown == [], f"{where} names metrics Fender does not export: {unknown}"


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool not installed: apt-get install prometheus (.ci/run does)")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout
