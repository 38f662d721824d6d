"""tools/images.py without podman: the names it builds are the chart's, and the host's pip settings
reach a build only as read-only mounts and a pip configuration naming the mounted paths."""

from __future__ import annotations

from pathlib import Path

import images  # tools/, on sys.path through tests/deploy/conftest.py
import pytest


def test_the_images_built_are_the_ones_the_chart_pulls():
    import helmchart

    pulled = {c["image"] for o in helmchart.render(values_files=[images.ROOT / "charts/helora/ci/cpu-only.yaml"])
              if o["kind"] == "Deployment" for c in o["spec"]["template"]["spec"]["containers"]}
    pulled |= {c["image"] for o in helmchart.render() if o["kind"] == "Deployment"
               for c in o["spec"]["template"]["spec"]["containers"]}
    built = {images.image_name(t).removeprefix("localhost/") for t in (*images.CPU_TARGETS, images.GPU_TARGET)}
    assert pulled == built, f"chart only: {pulled - built}, built only: {built - pulled}"


def _settings(tmp_path: Path) -> dict[str, list[str]]:
    cert = tmp_path / "ca.pem"
    cert.write_text("not a secret: a public CA bundle\n")
    (tmp_path / "wheels").mkdir()
    return {"cert": [str(cert)], "find-links": [str(tmp_path / "wheels"), "https://example.org/links"],
            "extra-index-url": ["file:///opt/pypi/simple", "https://mirror.example.org/simple"],
            "default-timeout": ["180"]}


def test_pip_settings_reach_the_build_as_read_only_mounts_under_the_mount_point(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    mounts = images.pip_mounts(_settings(tmp_path), staging)
    volumes = mounts[1::2]
    assert mounts[::2] == ["-v"] * len(volumes) and all(v.endswith(":ro") for v in volumes)
    targets = [v.split(":")[1] for v in volumes]
    assert set(targets) == {images.PIP_MOUNT, images.PIP_CONF, f"{images.PIP_MOUNT}/cert.pem",
                            f"{images.PIP_MOUNT}/links0"}
    conf = (staging / "pip.conf").read_text()
    assert conf.splitlines() == [
        "[global]",
        f"cert = {images.PIP_MOUNT}/cert.pem",
        f"find-links = {images.PIP_MOUNT}/links0 https://example.org/links",
        "extra-index-url = https://mirror.example.org/simple",  # file:// left out: its links need its tree
        "default-timeout = 180",
    ]
    # every mount point of a nested mount exists in the staging directory (so none is made in a layer)
    assert (staging / "cert.pem").is_file() and (staging / "links0").is_dir()


def test_the_hosts_pip_config_is_read_by_key(monkeypatch):
    listed = ("global.cert='/etc/ssl/certs/ca.crt'\n"
              "global.find-links='\\n/opt/a\\n/opt/b'\n"  # a multi-line value, as pip prints it
              "wheel.find-links='/opt/not-for-install'\n"
              "global.constraint='/etc/xdg/pip/constraints.txt'\n"
              "install.extra-index-url='https://one.example.org/simple'\n"
              ":env:.cert='/etc/env-ca.crt'\n")

    class Done:
        returncode, stdout, stderr = 0, listed, ""

    monkeypatch.setattr(images.subprocess, "run", lambda *a, **k: Done())
    got = images.pip_settings()
    assert got == {"cert": ["/etc/env-ca.crt"], "find-links": ["/opt/a", "/opt/b"],
                   "extra-index-url": ["https://one.example.org/simple"]}  # PIP_* above install above global


def test_a_file_url_find_links_is_mounted_as_its_directory(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "staging").mkdir()
    mounts = images.pip_mounts({"find-links": [f"file://{tmp_path / 'wheels'}"]}, tmp_path / "staging")
    assert f"{tmp_path / 'wheels'}:{images.PIP_MOUNT}/links0:ro" in mounts


def test_clean_removes_only_a_directory_it_made(tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "data").write_text("keep")
    with pytest.raises(images.ImageError, match="was not made by tools/images.py"):
        images.clean(images.Podman(foreign))
    assert (foreign / "data").read_text() == "keep"


def test_an_unknown_target_is_refused_before_podman_runs():
    with pytest.raises(images.ImageError, match="unknown target 'evaluator-gpu'"):
        images.build(images.Podman(Path("/nonexistent")), "evaluator-gpu")
