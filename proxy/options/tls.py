"""The policy's TLS blocks: an upstream's ``tls`` and the listeners' ``server.tls`` / ``admin_tls``.

Only the settings: the contexts are built in proxy/upstream/tlscontext.py, and
proxy/ops/preflight.py's ``tls_file_problems`` checks the files a policy names (so a reload,
`fender validate --env` and `run` refuse an unusable file at the line naming it). See docs/tls.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from proxy.options.base import Flag, PolicyModel, Text, _valid_hostname
from proxy.options.units import Duration, describe_value, policy_error

__all__ = ["TLSVersion", "UpstreamTLSOptions", "ListenerTLSOptions"]

TLSVersion = Literal["TLSv1.2", "TLSv1.3"]


def _check_file_name(value: str | None) -> str | None:
    if value is not None and (not value or "\x00" in value):
        raise policy_error(f"{describe_value(value)} is not a file path")
    return value


class UpstreamTLSOptions(PolicyModel):
    """How Fender speaks TLS to the ``https://`` replicas of an upstream."""

    ca_file: Text | None = Field(
        default=None,
        description=(
            "PEM file of the certificate authorities that may sign the replicas' certificates. Default: the "
            "system trust store (as curl and ssl.create_default_context). Re-read when it changes on disk."
        ),
    )
    server_name: Text | None = Field(
        default=None,
        description=(
            "The name sent in SNI and verified against the replica's certificate. Default: each replica's "
            "host. Set it when replicas are addressed by IP but certified for a name."
        ),
    )
    cert_file: Text | None = Field(
        default=None,
        description=(
            "PEM client certificate (chain) presented to replicas that ask for one (mutual TLS); needs "
            "key_file. Re-read when it changes on disk: new connections use the new pair."
        ),
    )
    key_file: Text | None = Field(
        default=None,
        description="PEM private key of cert_file (unencrypted). Re-read with cert_file.",
    )
    min_version: TLSVersion = Field(
        default="TLSv1.2",
        description="Oldest TLS version accepted from a replica: TLSv1.2 (default) or TLSv1.3.",
    )
    verify: Flag = Field(
        default=True,
        description=(
            "Verify the replica's certificate chain and name (default). false needs "
            "insecure_skip_verify: true as well, and every load of the policy warns about it."
        ),
    )
    insecure_skip_verify: Flag = Field(
        default=False,
        description=(
            "Confirms verify: false (accept any certificate, which lets anyone on the path read and change "
            "the traffic). Only with verify: false."
        ),
    )
    watch_interval: Annotated[Duration, Field(gt=0)] = Field(
        default="5s",
        validate_default=True,
        description=(
            "How often the certificate, key and CA files are checked for changes on disk (cert-manager and "
            "Vault rotate them in place); a changed file is used by the next new connection."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> UpstreamTLSOptions:
        for name in ("ca_file", "cert_file", "key_file"):
            try:
                _check_file_name(getattr(self, name))
            except ValueError as exc:
                raise policy_error(str(exc), name) from None
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise policy_error(
                "a client certificate needs both cert_file and key_file (mutual TLS)",
                "cert_file" if missing == "cert_file" else "key_file",
            )
        if not self.verify and not self.insecure_skip_verify:
            raise policy_error(
                "verify: false accepts any certificate; confirm it with insecure_skip_verify: true "
                "(or keep verify: true and give ca_file)",
                "verify",
            )
        if self.insecure_skip_verify and self.verify:
            raise policy_error(
                "insecure_skip_verify: true only goes with verify: false (write both, or neither)",
                "insecure_skip_verify",
            )
        if self.server_name is not None and not _valid_hostname(self.server_name.lower()):
            raise policy_error(f"{describe_value(self.server_name)} is not a host name", "server_name")
        return self

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.ca_file, self.cert_file, self.key_file) if f is not None)


class ListenerTLSOptions(PolicyModel):
    """HTTPS on a listener: its certificate and, optionally, client certificates to verify."""

    cert_file: Text = Field(
        description=(
            "PEM certificate (chain, leaf first) the listener presents. Watched: when it or key_file changes "
            "on disk (atomic rename or write in place), new handshakes use the new pair."
        ),
    )
    key_file: Text = Field(description="PEM private key of cert_file (unencrypted).")
    client_ca_file: Text | None = Field(
        default=None,
        description="PEM file of the authorities whose client certificates are accepted (mutual TLS).",
    )
    client_auth: Literal["none", "optional", "require"] = Field(
        default="none",
        description=(
            "none: ask for no client certificate; optional: verify one if the client sends it; require: "
            "refuse the handshake without a valid one. optional and require need client_ca_file."
        ),
    )
    min_version: TLSVersion = Field(
        default="TLSv1.2",
        description="Oldest TLS version a client may use: TLSv1.2 (default) or TLSv1.3.",
    )
    watch_interval: Annotated[Duration, Field(gt=0)] = Field(
        default="5s",
        validate_default=True,
        description="How often the certificate, key and client CA files are checked for changes on disk.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ListenerTLSOptions:
        for name in ("cert_file", "key_file", "client_ca_file"):
            try:
                _check_file_name(getattr(self, name))
            except ValueError as exc:
                raise policy_error(str(exc), name) from None
        if self.client_auth != "none" and self.client_ca_file is None:
            raise policy_error(
                f"client_auth: {self.client_auth} needs client_ca_file (the authorities to verify clients with)",
                "client_auth",
            )
        return self

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.cert_file, self.key_file, self.client_ca_file) if f is not None)
