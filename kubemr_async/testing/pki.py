"""The test cluster's keys and certificates: a CA, serving and client certs, SA keys.

Kept apart from ``cluster`` (which runs the control plane with them) and ``kubelet``
(which serves pod logs with a self-signed cert), so both depend on this module and not
on each other. Uses the ``cryptography`` package when installed and ``openssl`` otherwise.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import subprocess
from pathlib import Path

#: The in-cluster "kubernetes" Service address (the first of cluster.SERVICE_CLUSTER_IP_RANGE):
#: a SAN of the apiserver's serving cert.
_SERVICE_IP = "10.0.0.1"
_SERVING_DNS_NAMES = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]


def make_pki(directory: Path) -> None:
    """Create the cluster's keys and certificates in ``directory``.

    * ``ca.{crt,key}``: the CA every client verifies the apiserver with;
    * ``apiserver.{crt,key}``: the apiserver's serving cert, signed by the CA;
    * ``apiserver-kubelet-client.{crt,key}``: the client cert the apiserver presents to
      kubelets (for ``pods/log``), signed by the CA, in group ``system:masters``;
    * ``sa.{key,pub}``: the service-account token signing key pair.

    We generate our own CA instead of letting the apiserver self-sign so that clients can
    verify TLS properly with ``ca.crt``, exactly as they would against a real cluster. Uses
    the ``cryptography`` package when installed (it comes with the test extras) and the
    ``openssl`` command otherwise.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("cryptography") is not None:
        _make_pki_cryptography(directory)
    else:
        _make_pki_openssl(directory)


def make_self_signed_cert(
    directory: Path,
    stem: str,
    common_name: str,
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
    dns_names: tuple[str, ...] = ("localhost",),
) -> tuple[Path, Path]:
    """Write a self-signed TLS serving cert ``<stem>.crt`` and key ``<stem>.key``.

    For servers that nobody verifies against our CA (the fake kubelet: the apiserver does
    not check kubelet serving certs unless ``--kubelet-certificate-authority`` is set).
    Same backends as ``make_pki``; returns the (cert, key) paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("cryptography") is not None:
        _self_signed_cryptography(directory, stem, common_name, ip_addresses, dns_names)
    else:
        _self_signed_openssl(directory, stem, common_name, ip_addresses, dns_names)
    return directory / f"{stem}.crt", directory / f"{stem}.key"


def _make_pki_cryptography(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def new_key(name: str) -> rsa.RSAPrivateKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (directory / name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        return key

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=365))

    ca_key = new_key("ca.key")
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubemr-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        stem: str, subject: x509.Name, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> None:
        key = new_key(f"{stem}.key")
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in _SERVING_DNS_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", _SERVICE_IP)]
    issue(
        "apiserver",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        ExtendedKeyUsageOID.SERVER_AUTH,
        sans,
    )
    issue(
        "apiserver-kubelet-client",
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-kubelet-client"),
            ]
        ),
        ExtendedKeyUsageOID.CLIENT_AUTH,
        [],
    )

    sa_key = new_key("sa.key")
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _make_pki_openssl(directory: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "365",
        "-subj",
        "/CN=kubemr-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )

    def issue(stem: str, subject: str, extensions: str) -> None:
        (directory / f"{stem}.ext").write_text(extensions)
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            f"{stem}.key",
            "-out",
            f"{stem}.csr",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{stem}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-extfile",
            f"{stem}.ext",
            "-out",
            f"{stem}.crt",
        )

    sans = ",".join(
        [f"DNS:{n}" for n in _SERVING_DNS_NAMES] + ["IP:127.0.0.1", f"IP:{_SERVICE_IP}"]
    )
    issue(
        "apiserver",
        "/CN=kube-apiserver",
        f"subjectAltName={sans}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    issue(
        "apiserver-kubelet-client",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key")
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")


def _self_signed_cryptography(
    directory: Path, stem: str, common_name: str, ips: tuple[str, ...], dns: tuple[str, ...]
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())  # P-256: instant, unlike RSA keygen
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _self_signed_openssl(
    directory: Path, stem: str, common_name: str, ips: tuple[str, ...], dns: tuple[str, ...]
) -> None:
    sans = ",".join([f"DNS:{n}" for n in dns] + [f"IP:{ip}" for ip in ips])
    # A config file rather than -subj/-addext: -addext clashes with the defaults of some
    # openssl.cnf files (duplicate basicConstraints) and needs OpenSSL >= 1.1.1.
    (directory / f"{stem}.cnf").write_text(
        "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n"
        f"[dn]\nCN = {common_name}\n"
        f"[ext]\nsubjectAltName = {sans}\nbasicConstraints = critical,CA:FALSE\n"
        "extendedKeyUsage = serverAuth\n"
    )
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "365",
            "-config",
            f"{stem}.cnf",
            "-keyout",
            f"{stem}.key",
            "-out",
            f"{stem}.crt",
        ],
        cwd=directory,
        check=True,
        capture_output=True,
    )
