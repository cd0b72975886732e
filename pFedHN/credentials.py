"""Make the TLS certificates and SuperNode keys for a secure deployment.

    python -m pFedHN.credentials <dir> [--supernodes N] [--hosts 127.0.0.1,localhost]

writes, with the ``openssl`` and ``ssh-keygen`` tools (as in Flower's guides):

- ``ca.crt``, ``ca.key``: a certificate authority, made for this federation;
- ``superlink.pem``, ``superlink.key``: the SuperLink's TLS certificate, signed
  by the CA, valid for every name in ``--hosts`` (the addresses SuperNodes and
  ``flwr`` use to reach the SuperLink);
- ``supernode_<i>``, ``supernode_<i>.pub``: one EC key pair (NIST P-384, SSH
  format) per SuperNode; register each ``.pub`` with ``flwr supernode register``.

SuperNodes and ``flwr`` get ``ca.crt`` only. Keep ``ca.key`` and the private
keys off shared disks.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
from pathlib import Path

DAYS = "365"


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")


def _subject_alt_names(hosts: list[str]) -> str:
    names = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            names.append(f"IP:{host}")
        except ValueError:
            names.append(f"DNS:{host}")
    return "subjectAltName=" + ",".join(names)


def make_credentials(directory: Path, supernodes: int, hosts: list[str]) -> None:
    """Write the CA, the SuperLink's certificate and ``supernodes`` key pairs."""
    missing = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found; install OpenSSL and OpenSSH")
    directory.mkdir(parents=True, exist_ok=True)
    d = {name: str(directory / name) for name in (
        "ca.key", "ca.crt", "superlink.key", "superlink.csr", "superlink.pem", "san.ext")}
    _run("openssl", "genrsa", "-out", d["ca.key"], "3072")
    _run("openssl", "req", "-new", "-x509", "-key", d["ca.key"], "-sha256",
         "-subj", "/CN=pFedHN federation CA", "-days", DAYS, "-out", d["ca.crt"])
    _run("openssl", "genrsa", "-out", d["superlink.key"], "3072")
    _run("openssl", "req", "-new", "-key", d["superlink.key"], "-subj", f"/CN={hosts[0]}",
         "-out", d["superlink.csr"])
    Path(d["san.ext"]).write_text(_subject_alt_names(hosts) + "\n")
    _run("openssl", "x509", "-req", "-in", d["superlink.csr"], "-CA", d["ca.crt"],
         "-CAkey", d["ca.key"], "-CAcreateserial", "-out", d["superlink.pem"],
         "-days", DAYS, "-sha256", "-extfile", d["san.ext"])
    for i in range(supernodes):
        key = directory / f"supernode_{i}"
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        _run("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", f"supernode_{i}",
             "-f", str(key))


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--hosts", default="127.0.0.1,localhost",
                        help="comma-separated addresses of the SuperLink")
    args = parser.parse_args()
    make_credentials(args.directory, args.supernodes, args.hosts.split(","))
    print(f"wrote the CA, the SuperLink certificate and {args.supernodes} SuperNode key "
          f"pairs to {args.directory}")


if __name__ == "__main__":
    main()
