import pytest

from zhiling.hosts import is_loopback_host


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "app.localhost", "127.0.0.1", "127.9.9.9", "::1",
                                  "[::1]", " 127.0.0.1 "])
def test_loopback_hosts(host):
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", [None, "", "0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.com",
                                  "localhost.example.com", "127.0.0.1.nip.io"])
def test_hosts_others_can_reach(host):
    assert not is_loopback_host(host)
