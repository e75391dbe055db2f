"""TLS for TURN over TLS ("turns:"): the server context from [tls] cert and key, checked so
that a missing, unreadable, expired or mismatched pair is one line at start-up (and in
``turnd check-config``), reloaded on SIGHUP for new connections; and ``turnd gen-cert``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl

from .config import ConfigError, TlsConfig


def load_context(tls: TlsConfig, now: datetime.datetime | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2 and 1.3) for ``tls``; ConfigError names what is wrong."""
    from cryptography import x509
    for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        if not path:
            raise ConfigError(key, "must be set too (tls.cert and tls.key go together)")
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(key, f"{path}: {exc.strerror or exc}") from None
    with open(tls.cert, "rb") as f:
        pem = f.read()
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ConfigError("tls.cert", f"{tls.cert}: not a PEM certificate") from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise ConfigError("tls.cert", f"{tls.cert}: expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise ConfigError("tls.cert", f"{tls.cert}: not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    with open(tls.key, "rb") as f:
        key_pem = f.read()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # From the very bytes checked above (a renewal writing the files meanwhile can't
        # slip another certificate in): ssl loads from paths, so from memory files.
        with _memfile(pem) as cert_path, _memfile(key_pem) as key_path:
            context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        text = str(exc).lower()
        reason = "the key does not match the certificate" if "mismatch" in text \
            else "not a PEM private key" if "pem" in text \
            else f"cannot load the key: {exc.reason or exc}"
        raise ConfigError("tls.key", f"{tls.key}: {reason}") from None
    return context


class _memfile:
    """A path to ``data`` that lives in memory only (a memfd; nothing on disk)."""

    def __init__(self, data: bytes):
        self.fd = os.memfd_create("turnd-tls", os.MFD_CLOEXEC)
        os.write(self.fd, data)

    def __enter__(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def key_readable_by_others(path: str) -> bool:
    """Can users other than the owner and group read the key (mode o+r)?"""
    try:
        return bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False


def generate(host: str, out: str, days: int = 365) -> tuple[str, str]:
    """A self-signed certificate for ``host`` (a name or an IP address) and its key, written to
    ``out``/turnd.crt and ``out``/turnd.key (mode 0600).  Returns the two paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    try:
        names = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        names = [x509.DNSName(host)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    os.makedirs(out, exist_ok=True)
    cert_path, key_path = os.path.join(out, "turnd.crt"), os.path.join(out, "turnd.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def spki_sha256(cert_path: str) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): what Chromium's
    --ignore-certificate-errors-spki-list takes, to trust one test certificate."""
    import base64
    import hashlib
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()
