"""coturn's turnutils_stunclient against a running turnd."""

import re

import pytest
import trio

from turnd.server import serve

from .helpers import server_config
from .interop import need

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("index", [0, 1], ids=["ipv4", "ipv6"])
async def test_turnutils_stunclient_sees_its_own_address(nursery, index):
    tool = need("turnutils_stunclient")
    running = await nursery.start(serve, server_config())
    seen = []
    handle = running.core.handle_untrusted

    def recording(data, ft, now):
        seen.append(ft.client)
        return handle(data, ft, now)

    running.core.handle_untrusted = recording
    host, port = running.udp[index]
    with trio.fail_after(20):
        result = await trio.run_process([tool, "-p", str(port), host], capture_stdout=True,
                                        capture_stderr=True)
    out = result.stdout.decode()
    found = re.findall(r"UDP reflexive addr: (\S+)", out)
    assert found, out
    printed_host, _, printed_port = found[0].rpartition(":")
    assert seen, "turnd saw no request"
    assert (printed_host.strip("[]"), int(printed_port)) == seen[0]
