"""``gatekeep kubeconfig TARGET --identity NAME``: a kubeconfig that points kubectl at gatekeep."""

from __future__ import annotations

import base64
import re
import sys

import yaml


_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)


def register(sub) -> None:
    p = sub.add_parser("kubeconfig", help="print a kubeconfig that points kubectl at a kubernetes target")
    p.add_argument("target", help="the name of a target with protocol: kubernetes")
    p.add_argument("--identity", required=True, help="the gatekeep identity kubectl acts as")
    p.add_argument("--config", "-c", default=None, help="the gateway's configuration (default: $GATEKEEP_CONFIG or gatekeep.yaml)")
    p.add_argument("--token", help="the identity's token (default: a placeholder to replace)")
    p.add_argument("--server", help="the URL kubectl uses (default: from the target's listen)")
    p.add_argument("--ca", help="PEM file with the CA that signed gatekeep's certificate "
                                "(default: the last certificate of the target's tls.cert)")
    p.add_argument("--namespace", "-n", help="the context's default namespace")
    p.add_argument("--exec", action="store_true", dest="exec_plugin",
                   help="for OIDC users: kubectl runs 'gatekeep token show --exec-credential' for a fresh token "
                        "(after gatekeep login) instead of keeping a token in the kubeconfig")
    p.add_argument("--issuer", help="with --exec: the issuer whose token to show (default: the last signed in at)")
    p.set_defaults(func=kubeconfig)


def server_url(listen: str, tls: bool) -> str:
    """``https://127.0.0.1:16443`` from ``tcp:16443:interface=127.0.0.1``."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", listen.strip())]
    if parts[0] not in ("tcp", "tcp6", "ssl") or len(parts) < 2:
        raise ValueError(f"cannot tell a URL from listen {listen!r}: use --server")
    host = "::1" if parts[0] == "tcp6" else "127.0.0.1"
    port = None
    for i, part in enumerate(parts[1:]):
        key, eq, value = part.partition("=")
        if not eq and i == 0 and part.isdigit():
            port = part
        elif key == "port":
            port = value
        elif key == "interface" and value not in ("", "0.0.0.0", "::"):
            host = value
    if port is None:
        raise ValueError(f"cannot tell a URL from listen {listen!r}: use --server")
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def exec_user(issuer: str | None = None, command: str = "gatekeep") -> dict:
    """A kubeconfig user that gets its token from ``gatekeep token show`` (the device-login token)."""
    args = ["token", "show", "--exec-credential"] + (["--issuer", issuer] if issuer else [])
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": command, "args": args,
                     "interactiveMode": "Never", "provideClusterInfo": False,
                     "installHint": "gatekeep is needed, signed in with 'gatekeep login'"}}


def build(target, identity: str, token: str | dict, server: str, ca_pem: bytes | None, namespace: str | None) -> dict:
    cluster_name = f"gatekeep-{target}"
    user_name = f"{identity}@{cluster_name}"
    cluster: dict = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode("ascii")
    context: dict = {"cluster": cluster_name, "user": user_name}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster_name, "cluster": cluster}],
        "users": [{"name": user_name, "user": token if isinstance(token, dict) else {"token": token}}],
        "contexts": [{"name": cluster_name, "context": context}],
        "current-context": cluster_name,
        "preferences": {},
    }


def kubeconfig(args) -> int:
    """Reads only what it needs from the configuration (the target, identity names, the TLS certificate):
    upstream secrets need not be available where this runs."""
    import os
    from pathlib import Path

    from gatekeep.secrets import SecretError, resolve

    from gatekeep.cli._store import read_config_data
    from gatekeep.config import ConfigError

    path = Path(args.config or os.environ.get("GATEKEEP_CONFIG", "gatekeep.yaml"))
    try:
        data = read_config_data(path)
    except ConfigError as e:
        sys.stderr.write(f"gatekeep: {e}\n")
        return 2

    def listed(key: str) -> list:
        value = data.get(key)
        return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []

    oidc = data.get("oidc")
    if oidc is not None and not isinstance(oidc, dict):
        sys.stderr.write(f"gatekeep: oidc in {path}: expected a mapping\n")
        return 1
    targets = listed("targets")
    target = next((t for t in targets if t.get("name") == args.target), None)
    if target is None:
        sys.stderr.write(f"gatekeep: no target {args.target!r} in {path}\n")
        return 1
    if target.get("protocol") != "kubernetes":
        sys.stderr.write(f"gatekeep: target {args.target!r} is {target.get('protocol')}, not kubernetes\n")
        return 1
    exec_plugin = getattr(args, "exec_plugin", False)
    if exec_plugin and args.token:
        sys.stderr.write("gatekeep: --exec and --token exclude each other\n")
        return 2
    if exec_plugin and not oidc:
        sys.stderr.write(f"gatekeep: --exec needs an oidc issuer in {path}\n")
        return 1
    if not exec_plugin and not any(i.get("name") == args.identity for i in listed("identities")):
        sys.stderr.write(f"gatekeep: no identity {args.identity!r} in {path}\n")
        return 1
    tls = target.get("tls")
    try:
        server = args.server or server_url(str(target.get("listen", "")), bool(tls))
    except ValueError as e:
        sys.stderr.write(f"gatekeep: {e}\n")
        return 1
    ca = None
    if args.ca:
        try:
            with open(args.ca, "rb") as f:
                ca = f.read()
        except OSError as e:
            sys.stderr.write(f"gatekeep: --ca {args.ca}: {e.strerror}\n")
            return 2
        if not _PEM.search(ca):
            sys.stderr.write(f"gatekeep: --ca {args.ca}: no PEM certificate in it\n")
            return 2
    elif isinstance(tls, dict) and tls.get("cert"):
        if not isinstance(tls["cert"], str):
            sys.stderr.write(f"gatekeep: targets.{args.target}.tls.cert: expected a file: reference\n")
            return 1
        try:
            pem = resolve(tls["cert"], path.resolve().parent, strip=False).reveal()
        except SecretError as e:
            sys.stderr.write(f"gatekeep: targets.{args.target}.tls.cert: {e}\n")
            return 1
        certs = _PEM.findall(pem)
        ca = certs[-1].strip() + b"\n" if certs else None
    if exec_plugin:
        token = exec_user(args.issuer or oidc.get("issuer"))
    else:
        token = args.token or f"<the token of {args.identity}>"
    sys.stdout.write(yaml.safe_dump(build(args.target, args.identity, token, server, ca, args.namespace),
                                    sort_keys=False))
    if not args.token and not exec_plugin:
        sys.stderr.write(f"gatekeep: replace the token placeholder with {args.identity}'s token "
                         "(gatekeep token new prints one)\n")
    return 0
