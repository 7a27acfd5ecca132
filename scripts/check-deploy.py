#!/usr/bin/env python3
"""Checks of deploy/ that need a YAML parser or the Kubernetes schemas.

Run with the virtual environment that scripts/install-test-tools.sh makes
(target/deploy-venv/bin/python); collector/tests/it/deploy.rs calls it.

  check-deploy.py kubernetes             render the kustomizations (the one
                                         collector and the several-collector
                                         layout), validate every object
                                         against the Kubernetes schemas
                                         (strict), cross-check names
  check-deploy.py prometheusrule OUT     the PrometheusRule's groups equal the
                                         rule file's; writes them to OUT for
                                         promtool check rules
  check-deploy.py docker                 compose file and Dockerfiles refer to
                                         files that exist; images are non-root

Exits non-zero with a message naming the problem.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "kubernetes")
K8S_VERSION = "1.30.0"
CRD_GROUPS = ("monitoring.coreos.com/",)

failures = []

# Kubernetes' recommended labels every capwatch object of these kinds
# carries (the others: part-of and managed-by, from the kustomizations).
RECOMMENDED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component",
                      "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by")
COMPONENT_KINDS = ("DaemonSet", "Deployment", "Job", "Service", "PersistentVolumeClaim",
                   "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule")


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def render(directory):
    """The objects `kubectl apply -k directory` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", directory], check=True, capture_output=True, text=True
        ).stdout
        print(f"rendered {os.path.relpath(directory, ROOT)} with kubectl kustomize")
        return [d for d in yaml.safe_load_all(out) if d is not None]
    print(
        f"NOTE: kubectl not found; rendering {os.path.relpath(directory, ROOT)} with the "
        "built-in subset of kustomize (resources, namespace, labels, configMapGenerator, images)"
    )
    return render_subset(directory)


def render_subset(directory):
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images"}
    unknown = set(k) - known
    if unknown:
        raise SystemExit(f"{directory}: the built-in renderer does not know {sorted(unknown)}")
    objs = []
    for r in k.get("resources", []):
        objs += load_all(os.path.join(directory, r))
    for g in k.get("configMapGenerator", []):
        data = {}
        for f in g.get("files", []):
            with open(os.path.join(directory, f)) as fh:
                data[os.path.basename(f)] = fh.read()
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data})
    pairs = {}
    for l in k.get("labels", []):
        pairs.update(l.get("pairs", {}))
    images = {i["name"]: i for i in k.get("images", [])}
    for o in objs:
        md = o.setdefault("metadata", {})
        if "namespace" in k and o["kind"] != "Namespace":
            md["namespace"] = k["namespace"]
        md.setdefault("labels", {}).update(pairs)
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            i = images.get(c["image"])
            if i:
                c["image"] = f'{i.get("newName", c["image"])}:{i["newTag"]}'
    return objs


def index(objs):
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    return by_kind


def check_workloads(where, objs):
    """Checks every layout's objects must pass; returns them by kind."""
    by_kind = index(objs)
    for o in objs:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != "capwatch":
            fail(f'{where}: {o["kind"]}/{o["metadata"]["name"]} is not in namespace capwatch')

    # Workloads: volumes name objects that exist; the agent runs on GPU
    # nodes only, with the NVIDIA runtime and small requests.
    for kind in ("DaemonSet", "Deployment", "Job"):
        for name, o in by_kind.get(kind, {}).items():
            spec = o["spec"]["template"]["spec"]
            for v in spec.get("volumes", []):
                if "configMap" in v and v["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
                    fail(f'{where}: {kind}/{name}: no ConfigMap {v["configMap"]["name"]}')
                if "persistentVolumeClaim" in v:
                    claim = v["persistentVolumeClaim"]["claimName"]
                    if claim not in by_kind.get("PersistentVolumeClaim", {}):
                        fail(f"{where}: {kind}/{name}: no PersistentVolumeClaim {claim}")
            for c in spec["containers"]:
                if not c.get("resources", {}).get("requests"):
                    fail(f"{where}: {kind}/{name}: container {c['name']} has no resource requests")
                if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                    fail(f"{where}: {kind}/{name}: container {c['name']} may escalate privileges")
            if not spec.get("securityContext", {}).get("runAsNonRoot"):
                fail(f"{where}: {kind}/{name}: not runAsNonRoot")
    agent = by_kind.get("DaemonSet", {}).get("capwatch-agent")
    if agent:
        spec = agent["spec"]["template"]["spec"]
        if spec.get("runtimeClassName") != "nvidia":
            fail(f"{where}: agent DaemonSet: runtimeClassName is not nvidia")
        if spec.get("nodeSelector", {}).get("nvidia.com/gpu.present") != "true":
            fail(f"{where}: agent DaemonSet: not restricted to GPU nodes (nodeSelector nvidia.com/gpu.present)")

    # The recommended labels (app.kubernetes.io/*), on the objects and on
    # the pods they make: what `kubectl get -l`, dashboards and policies
    # select on.
    for o in objs:
        labels = o["metadata"].get("labels", {})
        want = RECOMMENDED_LABELS if o["kind"] in COMPONENT_KINDS else ("app.kubernetes.io/part-of",
                                                                          "app.kubernetes.io/managed-by")
        for label in want:
            if not labels.get(label):
                fail(f'{where}: {o["kind"]}/{o["metadata"]["name"]} has no label {label}')
        template = o.get("spec", {}).get("template", {}).get("metadata", {}).get("labels")
        if template is not None:
            for label in ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/component"):
                if not template.get(label):
                    fail(f'{where}: {o["kind"]}/{o["metadata"]["name"]}: its pods have no label {label}')

    # Services select pods that exist.
    pods = [o["spec"]["template"]["metadata"]["labels"] for k in ("DaemonSet", "Deployment")
            for o in by_kind.get(k, {}).values()]
    for name, svc in by_kind.get("Service", {}).items():
        sel = svc["spec"]["selector"]
        if not any(all(p.get(k) == v for k, v in sel.items()) for p in pods):
            fail(f"{where}: Service/{name} selects no pod template")
    return by_kind


def check_collector_service(where, by_kind, config):
    """The collector Service's appProtocol says what its ports speak (gRPC
    with TLS when collector.toml sets tls_cert, HTTP in the clear), and a
    NetworkPolicy lets only the agents reach the gRPC port."""
    cfg = read_toml(config)
    svc = by_kind.get("Service", {}).get("capwatch-collector")
    if not svc:
        fail(f"{where}: no Service/capwatch-collector")
        return
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    grpc = "https" if cfg.get("tls_cert") else "kubernetes.io/h2c"
    for name, proto in (("grpc", grpc), ("http", "http")):
        got = ports.get(name, {}).get("appProtocol")
        if got != proto:
            fail(f"{where}: Service/capwatch-collector port {name}: appProtocol {got}, not {proto} "
                 f"(tls_cert {'set' if cfg.get('tls_cert') else 'unset'})")
    collector_pods = by_kind.get("Deployment", {}).get("capwatch-collector", {}).get(
        "spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
    agent_pods = by_kind.get("DaemonSet", {}).get("capwatch-agent", {}).get(
        "spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
    policies = [p for p in by_kind.get("NetworkPolicy", {}).values()
                if all(collector_pods.get(k) == v
                       for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())]
    if len(policies) != 1:
        fail(f"{where}: {len(policies)} NetworkPolicies select the collector pods, not one")
        return
    for rule in policies[0]["spec"].get("ingress", []):
        if any(p.get("port") == "grpc" for p in rule.get("ports", [])):
            sources = rule.get("from", [])
            if not sources or not all(
                    all(agent_pods.get(k) == v for k, v in f.get("podSelector", {}).get("matchLabels", {}).items())
                    and "podSelector" in f and "namespaceSelector" not in f and "ipBlock" not in f
                    for f in sources):
                fail(f"{where}: the collector's NetworkPolicy lets more than the agent pods reach gRPC")


def check_service_monitor(where, operator, by_kind):
    """The ServiceMonitor selects a Service of the layout and names one of its ports."""
    for name, sm in index(operator).get("ServiceMonitor", {}).items():
        want = sm["spec"]["selector"]["matchLabels"]
        svcs = [s for s in by_kind.get("Service", {}).values()
                if all(s["metadata"].get("labels", {}).get(k) == v for k, v in want.items())]
        if len(svcs) != 1:
            fail(f"{where}: ServiceMonitor/{name} selects {len(svcs)} Services, not one "
                 "(two would scrape every collector twice)")
        for svc in svcs:
            if "prometheus.io/scrape" in svc["metadata"].get("annotations", {}):
                fail(f'{where}: Service/{svc["metadata"]["name"]} has prometheus.io/scrape as well as '
                     f"ServiceMonitor/{name}: a Prometheus that honours both scrapes it twice")
        for ep in sm["spec"]["endpoints"]:
            if not any(ep["port"] in [p["name"] for p in s["spec"]["ports"]] for s in svcs):
                fail(f'{where}: ServiceMonitor/{name}: no Service port named {ep["port"]}')


def check_agent_port(where, operator, by_kind, config):
    """The agent's probes and the PodMonitor name its container port, which
    is the port its config's http_listen binds on every address."""
    agent = by_kind.get("DaemonSet", {}).get("capwatch-agent")
    if not agent:
        return
    template = agent["spec"]["template"]
    (c,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    listen = read_toml(config).get("http_listen", "")
    if not listen.startswith("0.0.0.0:"):
        fail(f"{where}: agent.toml: http_listen {listen!r} is not 0.0.0.0:PORT (the kubelet probes the pod's address)")
    elif ports.get("http") != int(listen.rsplit(":", 1)[1]):
        fail(f"{where}: agent container port http {ports.get('http')} is not http_listen's {listen}")
    for probe, path in (("readinessProbe", "/healthz"), ("livenessProbe", "/livez")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != "http":
            fail(f"{where}: agent {probe} is not GET {path} on port http")
    for name, pm in index(operator).get("PodMonitor", {}).items():
        want = pm["spec"]["selector"]["matchLabels"]
        if not all(template["metadata"]["labels"].get(k) == v for k, v in want.items()):
            fail(f"{where}: PodMonitor/{name} does not select the agent pods")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if ep["port"] not in ports:
                fail(f'{where}: PodMonitor/{name}: no agent container port named {ep["port"]}')


def without_generated_names(o):
    """`o` with the content hash of generated ConfigMap names dropped."""
    text = json.dumps(o, sort_keys=True)
    for name in ("capwatch-agent-config", "capwatch-collector-config"):
        text = re.sub(name + r"-[a-z0-9]{10}", name, text)
    return json.loads(text)


def read_toml(path):
    import tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


def check_ha(base, ha, ledger_init):
    """deploy/kubernetes/ha: several collectors on an external PostgreSQL."""
    where = "ha"
    b = index(base)
    h = index(ha)
    # What it shares with the single-collector layout stays the same.
    for kind, name in (("Namespace", "capwatch"), ("DaemonSet", "capwatch-agent")):
        if without_generated_names(h.get(kind, {}).get(name)) != without_generated_names(b.get(kind, {}).get(name)):
            fail(f"{where}: {kind}/{name} differs from deploy/kubernetes (copy it over)")
    for f in ("namespace.yaml", "agent-daemonset.yaml", "collector-networkpolicy.yaml", "config/tenants.toml"):
        with open(os.path.join(K8S, f)) as one, open(os.path.join(K8S, "ha", f)) as other:
            if one.read() != other.read():
                fail(f"{where}: {f} differs from deploy/kubernetes/{f}")
    if "PersistentVolumeClaim" in h:
        fail(f"{where}: a PersistentVolumeClaim: the collectors keep no state of their own")

    dep = h.get("Deployment", {}).get("capwatch-collector")
    if not dep:
        fail(f"{where}: no Deployment/capwatch-collector")
        return
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    spec = dep["spec"]["template"]["spec"]
    if dep["spec"].get("replicas", 1) < 2:
        fail(f"{where}: Deployment/capwatch-collector has fewer than 2 replicas")
    if any("persistentVolumeClaim" in v for v in spec.get("volumes", [])):
        fail(f"{where}: the collector Deployment mounts a PersistentVolumeClaim")
    terms = spec.get("affinity", {}).get("podAntiAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", [])
    if not any(t.get("topologyKey") == "kubernetes.io/hostname"
               and all(pod_labels.get(k) == v for k, v in t["labelSelector"]["matchLabels"].items())
               for t in terms):
        fail(f"{where}: no required anti-affinity keeping collectors on different nodes")
    (c,) = spec["containers"]
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        fail(f"{where}: the collector's readiness is not /readyz")
    env = {e["name"]: e for e in c.get("env", [])}
    if env.get("CAPWATCH_COLLECTOR_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        fail(f"{where}: CAPWATCH_COLLECTOR_ID is not the pod's name (downward API)")

    pdbs = [p for p in h.get("PodDisruptionBudget", {}).values()
            if all(pod_labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())]
    if len(pdbs) != 1 or pdbs[0]["spec"].get("minAvailable") != 1:
        fail(f"{where}: not one PodDisruptionBudget with minAvailable 1 for the collectors")
    svc = h.get("Service", {}).get("capwatch-collector")
    if not svc or svc["spec"].get("clusterIP") != "None":
        fail(f"{where}: Service/capwatch-collector is not headless (clusterIP: None)")

    # The collector config: PostgreSQL, its password from the mounted
    # Secret, never in the URL.
    cfg = read_toml(os.path.join(K8S, "ha", "config", "collector.toml"))
    url = cfg.get("ledger_url", "")
    if "ledger_path" in cfg:
        fail(f"{where}: collector.toml sets ledger_path and ledger_url")
    if not url.startswith("postgres://") or "target_session_attrs=read-write" not in url:
        fail(f"{where}: ledger_url is not a postgres:// URL with target_session_attrs=read-write")
    if ":" in url.removeprefix("postgres://").split("@")[0]:
        fail(f"{where}: ledger_url carries a password; use ledger_password_file")
    if url.removeprefix("postgres://").split("/")[0].count(",") < 1:
        fail(f"{where}: ledger_url names one host; list the primary and the standby")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    pw = cfg.get("ledger_password_file", "")
    if not any(secrets.get(n) == "capwatch-ledger" and pw.startswith(m + "/") for n, m in mounts.items()):
        fail(f"{where}: ledger_password_file {pw!r} is not in the mounted capwatch-ledger Secret")

    # The agents list the collectors (or one name that resolves to each).
    agent = read_toml(os.path.join(K8S, "ha", "config", "agent.toml"))
    if "collector" in agent or not agent.get("collectors"):
        fail(f"{where}: agent.toml does not set collectors = [...] (and only that)")
    for e in agent.get("collectors", []):
        if not e.startswith("https://"):
            fail(f"{where}: agent.toml: collector {e} is not https://")

    # The init Job writes the same ledger the collectors use.
    job = index(ledger_init).get("Job", {}).get("capwatch-ledger-init")
    if not job:
        fail(f"{where}/ledger-init: no Job/capwatch-ledger-init")
        return
    jspec = job["spec"]["template"]["spec"]
    (jc,) = jspec["containers"]
    if jc["args"] != ["init-ledger", f"--ledger-url={url}"]:
        fail(f"{where}/ledger-init: the Job does not run init-ledger --ledger-url={url}")
    jenv = {e["name"]: e.get("value") for e in jc.get("env", [])}
    if jenv.get("CAPWATCH_LEDGER_PASSWORD_FILE") != pw:
        fail(f"{where}/ledger-init: CAPWATCH_LEDGER_PASSWORD_FILE is not {pw}")
    jmounts = {m["name"]: m["mountPath"] for m in jc.get("volumeMounts", [])}
    jsecrets = {v["name"]: v["secret"]["secretName"] for v in jspec.get("volumes", []) if "secret" in v}
    if not any(jsecrets.get(n) == "capwatch-ledger" and pw.startswith(m + "/") for n, m in jmounts.items()):
        fail(f"{where}/ledger-init: the Job does not mount the capwatch-ledger Secret at {pw}")
    print(f"{where}: {dep['spec']['replicas']} collectors on {url.split('@')[1].split('/')[0]}, "
          "PodDisruptionBudget, headless Service, init Job on the same ledger")


def check_ledger_backup(base, backup):
    """The backup CronJob reads the collector's ledger claim, on the
    collector's node (the claim is ReadWriteOnce)."""
    where = "ledger-backup"
    dep = index(base).get("Deployment", {}).get("capwatch-collector")
    job = index(backup).get("CronJob", {}).get("capwatch-ledger-backup")
    if not dep or not job:
        fail(f"{where}: no Deployment/capwatch-collector or CronJob/capwatch-ledger-backup")
        return
    claim = next(v["persistentVolumeClaim"]["claimName"]
                 for v in dep["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    spec = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in spec["volumes"] if "persistentVolumeClaim" in v}
    terms = spec.get("affinity", {}).get("podAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", [])
    if not any(t.get("topologyKey") == "kubernetes.io/hostname"
               and all(pod_labels.get(k) == v for k, v in t["labelSelector"]["matchLabels"].items())
               for t in terms):
        fail(f"{where}: no required pod affinity putting the backup on the collector's node")
    if job["spec"].get("concurrencyPolicy") != "Forbid":
        fail(f"{where}: two backups may run at once (concurrencyPolicy is not Forbid)")
    steps = spec.get("initContainers", []) + spec["containers"]
    ledger = None
    for c in steps:
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        ledger = next((a.split("=", 1)[1] for a in c["args"] if a.startswith("--ledger=")), None)
        if not any(claims.get(n) == claim and ledger and ledger.startswith(m + "/")
                   for n, m in mounts.items()):
            fail(f"{where}: {c['name']} does not read {ledger} from the claim {claim}")
    if [c["args"][1] for c in steps] != ["backup", "verify"]:
        fail(f"{where}: not a backup, then a verify")
    print(f"{where}: hourly backup and verify of {ledger} on the collector's node")


def check_kubernetes():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    layouts = {
        "base": render(K8S),
        "prometheus-operator": render(os.path.join(K8S, "prometheus-operator")),
        "ledger-init": render(os.path.join(K8S, "ledger-init")),
        "ledger-backup": render(os.path.join(K8S, "ledger-backup")),
        "ha": render(os.path.join(K8S, "ha")),
        "ha/ledger-init": render(os.path.join(K8S, "ha", "ledger-init")),
    }
    validated = 0
    for where, objs in layouts.items():
        for o in objs:
            name = f'{where}: {o["kind"]}/{o["metadata"]["name"]}'
            if o["apiVersion"].startswith(CRD_GROUPS):
                print(f"skip schema of {name}: a Prometheus Operator CRD (checked below and by promtool)")
                continue
            try:
                kubernetes_validate.validate(o, K8S_VERSION, strict=True)
                validated += 1
                print(f"valid {name} (Kubernetes {K8S_VERSION}, strict)")
            except ValidationError as e:
                fail(f"{name}: {e.message} at {'.'.join(str(p) for p in e.path)}")
    for where in ("base", "ha"):
        if any(o["apiVersion"].startswith(CRD_GROUPS) for o in layouts[where]):
            fail(f"{where} holds Prometheus Operator objects: it would not apply without the CRDs")

    check_ledger_backup(layouts["base"], layouts["ledger-backup"])
    operator = layouts["prometheus-operator"]
    single = check_workloads("base", layouts["base"] + layouts["ledger-init"])
    for kind in ("Namespace", "DaemonSet", "Deployment", "Service", "PersistentVolumeClaim"):
        if kind not in single:
            fail(f"base: no {kind} rendered")
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        if kind not in index(operator):
            fail(f"prometheus-operator: no {kind} rendered")
    check_workloads("prometheus-operator", operator)
    check_service_monitor("base", operator, single)
    check_agent_port("base", operator, single, os.path.join(K8S, "config", "agent.toml"))
    check_collector_service("base", single, os.path.join(K8S, "config", "collector.toml"))
    several = check_workloads("ha", layouts["ha"] + layouts["ha/ledger-init"])
    for kind in ("Namespace", "DaemonSet", "Deployment", "Service", "PodDisruptionBudget", "Job"):
        if kind not in several:
            fail(f"ha: no {kind} rendered")
    check_service_monitor("ha", operator, several)
    check_agent_port("ha", operator, several, os.path.join(K8S, "ha", "config", "agent.toml"))
    check_collector_service("ha", several, os.path.join(K8S, "ha", "config", "collector.toml"))
    check_ha(layouts["base"], layouts["ha"], layouts["ha/ledger-init"])
    print(f"{validated} objects valid against the Kubernetes schemas")
    if validated < 16:
        fail(f"only {validated} objects validated")


def check_prometheusrule(out):
    with open(os.path.join(ROOT, "deploy/prometheus/rules/capwatch.rules.yml")) as f:
        rules = yaml.safe_load(f)
    (pr,) = load_all(os.path.join(K8S, "prometheus-operator/prometheusrule.yaml"))
    if pr["kind"] != "PrometheusRule":
        fail(f'prometheusrule.yaml holds a {pr["kind"]}')
    groups = pr["spec"]["groups"]
    if groups != rules["groups"]:
        fail("the PrometheusRule's groups differ from deploy/prometheus/rules/capwatch.rules.yml")
    with open(out, "w") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    n = sum(len(g["rules"]) for g in groups)
    print(f"PrometheusRule: {len(groups)} groups, {n} rules, equal to the rule file; written to {out}")


def check_docker():
    docker = os.path.join(ROOT, "deploy", "docker")
    with open(os.path.join(docker, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    for want in ("collector", "prometheus", "grafana"):
        if want not in services:
            fail(f"compose: no {want} service")
    agents = [n for n, s in services.items() if "agent" in str(s.get("image", ""))]
    if len(agents) < 2:
        fail(f"compose: {len(agents)} agents")
    for name, s in services.items():
        if "build" in s:
            ctx = os.path.normpath(os.path.join(docker, s["build"]["context"]))
            dockerfile = os.path.join(ctx, s["build"]["dockerfile"])
            if not os.path.isfile(dockerfile):
                fail(f"compose {name}: no {dockerfile}")
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                if not os.path.exists(os.path.normpath(os.path.join(docker, src))):
                    fail(f"compose {name}: bind mount {src} does not exist")
            elif src not in compose.get("volumes", {}):
                fail(f"compose {name}: volume {src} is not declared")
        for d in s.get("depends_on", []):
            if d not in services:
                fail(f"compose {name}: depends on unknown {d}")
        if name.startswith("agent") and "--source=mock" not in s.get("command", []):
            fail(f"compose {name}: not a mock agent")
        for p in s.get("ports", []):
            if not str(p).startswith("127.0.0.1:"):
                fail(f"compose {name}: port {p} is not on loopback")
    for f in ("agent.Dockerfile", "collector.Dockerfile"):
        lines = [l.strip() for l in open(os.path.join(docker, f)) if l.strip() and not l.startswith("#")]
        froms = [l for l in lines if l.startswith("FROM ")]
        if len(froms) < 2:
            fail(f"{f}: not multi-stage")
        final = lines[[i for i, l in enumerate(lines) if l.startswith("FROM ")][-1]:]
        users = [l.split()[1] for l in final if l.startswith("USER ")]
        if not users or users[-1].split(":")[0] in ("0", "root"):
            fail(f"{f}: the runtime stage does not switch to a non-root user")
        if not any(l.startswith("ENTRYPOINT") for l in final):
            fail(f"{f}: no ENTRYPOINT")
    for p in ("grafana/provisioning/datasources/prometheus.yml",
              "grafana/provisioning/dashboards/capwatch.yml"):
        with open(os.path.join(docker, p)) as f:
            yaml.safe_load(f)
    with open(os.path.join(ROOT, "deploy/grafana/capwatch-dashboard.json")) as f:
        json.load(f)
    print(f"compose: {len(services)} services ({len(agents)} mock agents); Dockerfiles multi-stage and non-root")


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd = sys.argv[1]
    if cmd == "kubernetes":
        check_kubernetes()
    elif cmd == "prometheusrule":
        check_prometheusrule(sys.argv[2])
    elif cmd == "docker":
        check_docker()
    else:
        raise SystemExit(__doc__)
    if failures:
        print(f"{len(failures)} problems", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
