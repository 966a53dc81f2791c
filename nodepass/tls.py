"""TLS for tunnels and the master (SPEC §1 ``tls``, §4 pool TLS).

``tls=1`` makes a self-signed certificate in memory at start (nothing is
written to disk, so a fresh key every run); ``tls=2`` loads PEM files and
re-reads them at most once per ``NP_RELOAD_INTERVAL`` so a renewed
certificate is picked up without a restart.  Either way only TLS 1.3 is
offered, as Go NodePass does.

Clients (pool connections of a dual-end client) follow the code the server
announced: ``1`` encrypts without verifying (the operator compares the
fingerprints both ends log), ``2`` verifies chain and host name.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from typing import Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer
from twisted.internet.ssl import TLSVersion

from nodepass.logs import NodeLog

TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

CertLike = Union[bytes, str, crypto.X509, x509.Certificate]


def generate_self_signed(common_name: str = "nodepass") -> tuple[bytes, bytes]:
    """A fresh self-signed certificate and its key, as PEM bytes.

    EC P-256 keeps generation instant and handshakes cheap; the certificate
    is valid for a year and names ``common_name`` (plus ``localhost`` and the
    loopback addresses) so tools that insist on a SAN still accept it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        sans.insert(0, x509.IPAddress(ipaddress.ip_address(common_name)))
    except ValueError:
        if common_name != "localhost":
            sans.insert(0, x509.DNSName(common_name))
    sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert_pem, key_pem


def _der(cert: CertLike) -> bytes:
    if isinstance(cert, x509.Certificate):
        return cert.public_bytes(serialization.Encoding.DER)
    if isinstance(cert, crypto.X509):
        return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    if isinstance(cert, ssl.Certificate):
        return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert.original)
    if isinstance(cert, str):
        cert = cert.encode("ascii")
    if isinstance(cert, bytes):
        if cert.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
        return cert  # already DER
    raise TypeError(f"not a certificate: {type(cert).__name__}")


def fingerprint(cert: CertLike) -> str:
    """``sha256:AB:CD:...``: SHA-256 of the DER certificate, uppercase hex
    pairs -- the form both tunnel ends log so operators can compare them."""
    digest = hashlib.sha256(_der(cert)).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _server_options(cert_pem: bytes, key_pem: bytes) -> ssl.CertificateOptions:
    certs = x509.load_pem_x509_certificates(cert_pem)
    leaf = crypto.X509.from_cryptography(certs[0])
    chain = [crypto.X509.from_cryptography(c) for c in certs[1:]]
    pkey = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    check = SSL.Context(SSL.TLS_METHOD)
    check.use_certificate(leaf)
    check.use_privatekey(pkey)
    check.check_privatekey()  # raises when the key does not match
    options = ssl.CertificateOptions(
        privateKey=pkey,
        certificate=leaf,
        extraCertChain=chain or None,
        raiseMinimumTo=TLSVersion.TLSv1_3,
        # TLS 1.3 session tickets: a client opening many pool connections
        # resumes instead of repeating the certificate exchange.
        enableSessionTickets=True,
    )
    # AES-128-GCM first, as Go's TLS stack orders them on AES hardware: the
    # cheapest of the three for bulk relaying, and what Go peers pick.
    try:
        options.getContext().set_tls13_ciphersuites(TLS13_SUITES)
    except (AttributeError, SSL.Error):
        pass  # older pyOpenSSL/OpenSSL: keep the library's order
    return options


class ServerCredentials:
    """The certificate a server (or master) presents, and its TLS code.

    Build with :meth:`from_config`; ``tls_code`` is the *effective* code
    (``2`` degrades to ``1`` when the files cannot be loaded), which is what
    the handshake announces to clients.
    """

    def __init__(
        self,
        tls_code: int,
        cert_pem: bytes = b"",
        key_pem: bytes = b"",
        crt_path: str = "",
        key_path: str = "",
        log: Optional[NodeLog] = None,
        reload_interval: float = 3600.0,
        clock=None,
    ):
        self.tls_code = tls_code
        self.crt_path = crt_path
        self.key_path = key_path
        self.log = log or NodeLog("none")
        self.reload_interval = reload_interval
        self.clock = clock
        self._cert_pem = cert_pem
        self._key_pem = key_pem
        self._options: Optional[ssl.CertificateOptions] = None
        self._quic_cache: Optional[tuple] = None  # (cert PEM, QUIC material) of the last load
        self._loaded_at = clock.seconds() if clock is not None else 0.0
        self.fingerprint = ""
        if tls_code:
            self._options = _server_options(cert_pem, key_pem)
            self.fingerprint = fingerprint(cert_pem)

    @staticmethod
    def _read(crt: str, key: str) -> tuple[bytes, bytes]:
        with open(crt, "rb") as f:
            cert_pem = f.read()
        with open(key, "rb") as f:
            key_pem = f.read()
        _server_options(cert_pem, key_pem)  # raises when they do not load or match
        return cert_pem, key_pem

    @classmethod
    def from_config(
        cls,
        tls: int,
        crt: str,
        key: str,
        log: NodeLog,
        reload_interval: float,
        clock,
        common_name: str = "nodepass",
    ) -> "ServerCredentials":
        if tls == 0:
            return cls(0, log=log, reload_interval=reload_interval, clock=clock)
        if tls == 2:
            try:
                cert_pem, key_pem = cls._read(crt, key)
            except Exception as e:  # noqa: BLE001 - any load failure means fallback
                log.error("TLS certificate load failed (crt=%s key=%s): %s; falling back to tls=1", crt, key, _why(e))
            else:
                return cls(2, cert_pem, key_pem, crt, key, log, reload_interval, clock)
        cert_pem, key_pem = generate_self_signed(common_name)
        return cls(1, cert_pem, key_pem, log=log, reload_interval=reload_interval, clock=clock)

    @property
    def cert_pem(self) -> bytes:
        return self._cert_pem

    def _maybe_reload(self) -> None:
        if self.tls_code != 2 or self.clock is None:
            return
        now = self.clock.seconds()
        if now - self._loaded_at < self.reload_interval:
            return
        self._loaded_at = now
        try:
            cert_pem, key_pem = self._read(self.crt_path, self.key_path)
        except Exception as e:  # noqa: BLE001 - keep serving the old certificate
            self.log.error("TLS certificate reload failed, keeping the current one: %s", _why(e))
            return
        if cert_pem != self._cert_pem or key_pem != self._key_pem:
            self._cert_pem, self._key_pem = cert_pem, key_pem
            self._options = _server_options(cert_pem, key_pem)
            self.fingerprint = fingerprint(cert_pem)
            self.log.info("TLS certificate reloaded: %s", self.fingerprint)

    def quic_material(self) -> tuple:
        """``(certificate, chain, private_key)`` as cryptography objects, for
        a new QUIC pool connection (reloaded like the TCP context)."""
        if not self.tls_code:
            raise ValueError("plain server (tls=0) has no certificate")
        self._maybe_reload()
        cached = self._quic_cache
        if cached is None or cached[0] is not self._cert_pem:
            certs = x509.load_pem_x509_certificates(self._cert_pem)
            key = serialization.load_pem_private_key(self._key_pem, password=None)
            cached = (self._cert_pem, (certs[0], certs[1:], key))
            self._quic_cache = cached
        return cached[1]

    def context_factory(self) -> ssl.CertificateOptions:
        """The server context factory to hand to ``startTLS``/``listenSSL``."""
        if not self.tls_code:
            raise ValueError("plain server (tls=0) has no TLS context")
        self._maybe_reload()
        assert self._options is not None
        return self._options


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text


def client_context_factory(tls_code: int, hostname: str, trust_roots=None):
    """Context for a client's pool connections (SPEC §4).

    ``1``: TLS 1.3, no verification.  ``2``: verify the chain against the
    system roots (or ``trust_roots``: an ``ssl.Certificate``, PEM bytes, a
    list of those, or any ``IOpenSSLTrustRoot``) and the host name with
    service_identity; a failure aborts the TLS handshake.
    """
    if tls_code == 1:
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3)
    if tls_code != 2:
        raise ValueError(f"no client TLS for code {tls_code}")
    root = trust_roots
    if root is None:
        root = ssl.platformTrust()
    elif isinstance(root, (bytes, str)):
        root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(root)])
    elif isinstance(root, ssl.Certificate):
        root = ssl.trustRootFromCertificates([root])
    elif isinstance(root, (list, tuple)):
        root = ssl.trustRootFromCertificates(
            [c if isinstance(c, ssl.Certificate) else ssl.Certificate.loadPEM(c) for c in root]
        )
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=root,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
    )


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClient:
    """Wraps a client context (from :func:`client_context_factory`) so that
    new connections resume the last TLS session the server issued a ticket
    for.  A pool opens many short-lived connections to one server; resuming
    skips the certificate exchange and its signature checks (the resumed
    session keeps the verified peer certificate, so ``tls=2`` checks still
    hold: a session only exists after a verified handshake)."""

    def __init__(self, inner):
        self.inner = inner
        self.session = None

    def clientConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        if IOpenSSLClientConnectionCreator.providedBy(self.inner):
            conn = self.inner.clientConnectionForTLS(tls_protocol)
        else:
            conn = SSL.Connection(self.inner.getContext(), None)
        if self.session is not None:
            conn.set_session(self.session)
        return conn

    def remember(self, tls_transport) -> None:
        """Keep the session of an established connection for the next."""
        try:
            session = tls_transport.getHandle().get_session()
        except Exception:  # noqa: BLE001 - no session: nothing to resume
            return
        if session is not None:
            self.session = session


def peer_certificate_fingerprint(transport) -> str:
    """Fingerprint of the certificate the TLS peer presented ('' if none)."""
    try:
        cert = transport.getPeerCertificate()
    except Exception:  # noqa: BLE001
        return ""
    if cert is None:
        return ""
    return fingerprint(cert)


def host_certificate_fingerprint(transport) -> str:
    """Fingerprint of our own certificate on a TLS transport ('' if none)."""
    try:
        cert = transport.getHandle().get_certificate()
    except Exception:  # noqa: BLE001
        return ""
    if cert is None:
        return ""
    return fingerprint(cert)
