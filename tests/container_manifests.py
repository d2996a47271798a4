"""Static checks of the container and Kubernetes files (run by tests/container.sh).

    python3 tests/container_manifests.py REPO_ROOT LB_BIN

Parses docker-compose.yml, every YAML file in deploy/k8s and the Dockerfile; runs
`LB_BIN --check` on lb's arguments from the compose `command:` and from the Deployment's
container `args:` (both must pass); and checks the fields the deployment relies on.
Prints one line per check; exits 1 if any failed, 0 otherwise. Needs PyYAML.
"""

import os
import re
import subprocess
import sys

import yaml

ROOT, LB_BIN = sys.argv[1], sys.argv[2]
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)
    return ok


def lb_check(args, where):
    """`lb --check ARGS` must exit 0 and say `configuration ok`."""
    try:
        p = subprocess.run([LB_BIN, "--check", *args], capture_output=True, text=True,
                           timeout=20)
        out = (p.stdout + p.stderr).strip()
        ok = p.returncode == 0 and "configuration ok" in out
    except (OSError, subprocess.TimeoutExpired) as e:
        out, ok = str(e), False
    check(ok, f"{where}: lb --check {' '.join(args)} -> {out}")


def flag(args, name, default=None):
    """The value after `name` in an argv list (`--name value` or `--name=value`)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def backends(args):
    """Every value after --backends up to the next flag (lb takes several per flag)."""
    out, on = [], False
    for a in args:
        if a.startswith("-"):
            on = a == "--backends"
            continue
        if on:
            out.append(a)
    return out


def seconds(d):
    """lb's duration syntax (`500ms`, `30s`, `1h30m`, `2d`) in seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h|d)", d)
    if not parts or "".join(n + u for n, u in parts) != d:
        raise ValueError(f"not a duration: {d!r}")
    return sum(float(n) * units[u] for n, u in parts)


def subset(small, big):
    return bool(small) and all(big.get(k) == v for k, v in small.items())


# --- Dockerfile: the stages the compose file, the test and the README name -------------
dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
stages = dict((m.group(2), m.group(1)) for m in
              re.finditer(r"^FROM\s+(\S+)\s+AS\s+(\S+)", dockerfile, re.M | re.I))
check(stages.get("builder") == "rust:1-bookworm", "Dockerfile: builder stage FROM rust:1-bookworm")
check(stages.get("runtime-base") in ("debian:bookworm-slim", "gcr.io/distroless/cc-debian12"),
      f"Dockerfile: runtime base is {stages.get('runtime-base')}")
for s in ("prebuilt", "mock-prebuilt", "mock", "runtime"):
    check(s in stages, f"Dockerfile: stage {s}")
last = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, re.M | re.I)[-1]
check(last == "runtime", f"Dockerfile: the default (last) stage is runtime (is {last})")
user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
check(bool(user) and all(u.split(":")[0] not in ("0", "root") and u.split(":")[0].isdigit()
                         for u in user), f"Dockerfile: USER numeric and not root ({user})")
check(re.search(r'^ENTRYPOINT\s+\["lb"\]', dockerfile, re.M) is not None, 'Dockerfile: ENTRYPOINT ["lb"]')
check(re.search(r"^EXPOSE\s+8080\s+9901\s*$", dockerfile, re.M) is not None, "Dockerfile: EXPOSE 8080 9901")
check(re.search(r"^HEALTHCHECK .*\n?.*/live", dockerfile, re.M) is not None, "Dockerfile: HEALTHCHECK on /live")
check(re.search(r"--features smol", dockerfile) is not None and "ARG BUILD" in dockerfile,
      "Dockerfile: ARG BUILD selects the smol build")

# --- docker-compose.yml ----------------------------------------------------------------
compose = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.yml")))
services = compose.get("services", {})
check("lb" in services, "compose: service lb")
lb_svc = services.get("lb", {})
cargs = [str(a) for a in (lb_svc.get("command") or [])]
check(isinstance(lb_svc.get("command"), list), "compose: lb's command is a list of arguments")
lb_check(cargs, "compose")
check(flag(cargs, "--admin-bind") == "0.0.0.0:9901", "compose: lb --admin-bind 0.0.0.0:9901")
check(flag(cargs, "--bind", "0.0.0.0") == "0.0.0.0" and flag(cargs, "--port", "8080") == "8080",
      "compose: lb listens on 0.0.0.0:8080")
ports = [str(p) for p in lb_svc.get("ports", [])]
check("8080:8080" in ports and "9901:9901" in ports, f"compose: lb publishes 8080 and 9901 ({ports})")
bs = backends(cargs)
check(len(bs) == 3, f"compose: three backends ({bs})")
for b in bs:
    m = re.match(r"http://([^:/]+):(\d+)$", b)
    name = m and m.group(1)
    svc = services.get(name) if name else None
    check(svc is not None, f"compose: backend {b} is a service")
    if svc:
        margs = [str(a) for a in (svc.get("command") or [])]
        check(flag(margs, "--bind") == "0.0.0.0" and flag(margs, "--port") == m.group(2),
              f"compose: {name} runs mock-backend --bind 0.0.0.0 --port {m.group(2)} ({margs})")
for name, svc in services.items():
    target = (svc.get("build") or {}).get("target")
    if target:
        check(target in stages, f"compose: {name} builds Dockerfile stage {target}")

# --- deploy/k8s ------------------------------------------------------------------------
kdir = os.path.join(ROOT, "deploy", "k8s")
docs, files = [], sorted(f for f in os.listdir(kdir) if f.endswith((".yaml", ".yml")))
for f in files:
    for d in yaml.safe_load_all(open(os.path.join(kdir, f))):
        if d:
            docs.append((f, d))
kinds = {}
for f, d in docs:
    kinds.setdefault(d.get("kind"), []).append(d)

kust = kinds.get("Kustomization", [])
if kust:
    listed = set(kust[0].get("resources", []))
    others = {f for f, d in docs if d.get("kind") != "Kustomization"}
    check(listed == others, f"k8s: kustomization lists every manifest ({sorted(listed)})")

deps = [d for d in kinds.get("Deployment", []) if d["metadata"]["name"] == "lb"]
check(len(deps) == 1, "k8s: one Deployment named lb")
dep = deps[0] if deps else {"spec": {"template": {"metadata": {}, "spec": {"containers": [{}]}}}}
spec, tpl = dep["spec"], dep["spec"]["template"]
pod, labels = tpl["spec"], tpl["metadata"].get("labels", {})
ctrs = [c for c in pod.get("containers", []) if c.get("name") == "lb"] or pod["containers"]
ctr = ctrs[0]
args = [str(a) for a in ctr.get("args", [])]
lb_check(args, "k8s Deployment")
check(spec.get("replicas") == 2, f"k8s: replicas 2 ({spec.get('replicas')})")
check(subset(spec.get("selector", {}).get("matchLabels", {}), labels),
      "k8s: the Deployment's selector matches its pod labels")

admin = flag(args, "--admin-bind", "")
check(admin.startswith("0.0.0.0:"), f"k8s: --admin-bind on all interfaces ({admin})")
admin_port = int(admin.rsplit(":", 1)[1]) if ":" in admin else None
named = {p.get("name"): p.get("containerPort") for p in ctr.get("ports", [])}
check(named.get("admin") == admin_port, f"k8s: container port 'admin' is {admin_port}")
check(named.get("http") == int(flag(args, "--port", "8080")), "k8s: container port 'http' is --port")


def probe(kind, path):
    hg = (ctr.get(kind) or {}).get("httpGet", {})
    port = hg.get("port")
    port = named.get(port, port)
    check(hg.get("path") == path and port == admin_port,
          f"k8s: {kind} GET {path} on the admin port ({hg})")


probe("readinessProbe", "/health")
probe("livenessProbe", "/live")

ann = tpl["metadata"].get("annotations", {})
check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(admin_port)
      and ann.get("prometheus.io/path") == "/metrics", f"k8s: Prometheus scrape annotations ({ann})")

sleep = ((ctr.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds")
check(isinstance(sleep, int) and sleep > 0, f"k8s: preStop sleep action ({sleep}s)")
grace = pod.get("terminationGracePeriodSeconds")
try:
    shutdown = seconds(flag(args, "--shutdown-timeout", "30s"))
except ValueError as e:
    shutdown = float("inf")
    check(False, f"k8s: --shutdown-timeout: {e}")
check(isinstance(grace, int) and isinstance(sleep, int) and grace > shutdown + sleep,
      f"k8s: terminationGracePeriodSeconds {grace} > preStop {sleep}s + --shutdown-timeout {shutdown:g}s")

psc, csc = pod.get("securityContext", {}), ctr.get("securityContext", {})
check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, "k8s: runAsNonRoot")
uid = csc.get("runAsUser", psc.get("runAsUser"))
check(uid is None or (isinstance(uid, int) and uid != 0), f"k8s: runAsUser not root ({uid})")
check(csc.get("readOnlyRootFilesystem") is True, "k8s: readOnlyRootFilesystem")
check(csc.get("allowPrivilegeEscalation") is False, "k8s: allowPrivilegeEscalation false")
req = (ctr.get("resources") or {}).get("requests", {})
check("cpu" in req and "memory" in req, f"k8s: resource requests ({req})")

# /admin/* stays closed off-loopback unless a token file from a Secret is mounted.
token = flag(args, "--admin-token-file")
if token:
    mounts = [m for m in ctr.get("volumeMounts", []) if token.startswith(m["mountPath"].rstrip("/") + "/")]
    secret_vols = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
    check(any(m["name"] in secret_vols for m in mounts), f"k8s: --admin-token-file {token} is on a Secret volume")
else:
    check("--admin-token-file" in open(os.path.join(kdir, "deployment.yaml")).read(),
          "k8s: no admin token (/admin/* is 403 off-loopback); the Secret variant is shown commented")

pdbs = kinds.get("PodDisruptionBudget", [])
check(len(pdbs) == 1, "k8s: one PodDisruptionBudget")
for pdb in pdbs:
    sel = pdb["spec"].get("selector", {}).get("matchLabels", {})
    check(subset(sel, labels), f"k8s: the PDB's selector {sel} matches the Deployment's pods")
    mina = pdb["spec"].get("minAvailable")
    check(isinstance(mina, int) and 0 < mina < spec.get("replicas", 0),
          f"k8s: PDB minAvailable {mina} below the replicas")

svcs = {s["metadata"]["name"]: s for s in kinds.get("Service", [])}
lbsvc = svcs.get("lb")
check(lbsvc is not None, "k8s: Service lb")
if lbsvc:
    check(subset(lbsvc["spec"].get("selector", {}), labels), "k8s: Service lb selects the Deployment's pods")
    tports = {p.get("targetPort") for p in lbsvc["spec"].get("ports", [])}
    check(tports and all(t in named or t in named.values() for t in tports),
          f"k8s: Service lb's targetPorts are container ports ({tports})")
heads = [s for s in svcs.values() if s["spec"].get("clusterIP") == "None"]
check(len(heads) == 1, "k8s: one headless Service (for the vLLM pods)")
for h in heads:
    name, hsel = h["metadata"]["name"], h["spec"].get("selector", {})
    check(bool(hsel) and not subset(hsel, labels), f"k8s: {name} selects pods other than lb's ({hsel})")
    hports = {p["port"] for p in h["spec"].get("ports", [])}
    disc = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--discover"]
    check(len(disc) == 1 and not backends(args),
          f"k8s: lb follows the headless Service with one --discover, no fixed --backends ({disc})")
    for d in disc:
        m = re.match(r"dns://([a-z0-9-]+)(\.[a-z0-9.-]+)?:(\d+)$", d)
        check(m is not None and m.group(1) == name and int(m.group(3)) in hports,
              f"k8s: --discover {d} names {name} on one of its ports {sorted(hports)}")

print(f"{len(failures)} failed" if failures else "all manifest checks passed")
sys.exit(1 if failures else 0)
