from loomnet.client import local_executors, remove_local_executor, write_local_executor


def test_state_files_announce_live_executors(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMNET_STATE_DIR", str(tmp_path))
    write_local_executor("12D3KooWexample", ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWexample"])
    [found] = local_executors()
    assert found.peer_id == "12D3KooWexample" and found.addrs[0].endswith("12D3KooWexample")
    remove_local_executor("12D3KooWexample")
    assert local_executors() == []


def test_dead_processes_and_garbage_are_ignored(tmp_path):
    folder = tmp_path / "executors"
    folder.mkdir()
    (folder / "dead.json").write_text('{"peer_id": "x", "addrs": [], "pid": 999999999}')
    (folder / "junk.json").write_text("{not json")
    assert local_executors(directory=tmp_path) == []
