"""Admin API tests' helpers: the token and a policy with admin_auth."""

from __future__ import annotations

import textwrap

TOKEN = "s3cret-token-of-32-characters-xx"


def admin_policy(upstream_port: int, admin: str = "127.0.0.1:0", auth: str = "") -> str:
    return textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        admin: {admin}
        reload: {{watch: false}}
        upstreams:
          echo: {{replicas: [{{url: http://127.0.0.1:{upstream_port}}}]}}
        routes:
          - {{name: all, upstream: echo}}
        """
    ) + (f"admin_auth: {auth}\n" if auth else "")
