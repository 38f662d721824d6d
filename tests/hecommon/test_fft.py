"""``hecommon.he.fft``: in-place batched transforms through FFTW (pyFFTW) or numpy, the same
values to the last bits' rounding, on aligned, unaligned and sliced blocks and from several threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hecommon.errors import ConfigError
from hecommon.he import fft

BACKENDS = ["numpy", pytest.param("fftw", marks=pytest.mark.skipif(fft._pyfftw() is None,
                                                                    reason="pyFFTW not installed"))]


def _rows(rng, shape) -> np.ndarray:
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_forward_and_inverse_are_numpys_unnormalized_transforms(backend, rows, monkeypatch):
    monkeypatch.setenv("HELORA_FFT", backend)
    assert fft.backend() == backend
    rng = np.random.default_rng(rows)
    for x in (fft.empty((rows, 1024)), fft.empty((rows * 1024 + 1,))[1:].reshape(rows, 1024)):  # aligned, 16 B off
        x[:] = _rows(rng, x.shape)
        want = np.fft.fft(x, axis=-1)
        fft.forward(x)
        np.testing.assert_allclose(x, want, rtol=0, atol=1e-10 * np.abs(want).max())
        want = np.fft.ifft(x, axis=-1, norm="forward")
        fft.inverse(x)
        np.testing.assert_allclose(x, want, rtol=0, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stack_of_blocks_sliced_along_its_rows_is_transformed_in_place(backend, monkeypatch):
    """``spec[:, :r]`` of a (2, 32, N/2) buffer (the decryption's two products of a partial block):
    each block's first r rows, and nothing past them."""
    monkeypatch.setenv("HELORA_FFT", backend)
    rng = np.random.default_rng(0)
    buf = fft.empty((2, 32, 512))
    buf[:] = _rows(rng, buf.shape)
    before = buf.copy()
    fft.inverse(buf[:, :7])
    np.testing.assert_allclose(buf[:, :7], np.fft.ifft(before[:, :7], axis=-1, norm="forward"), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(buf[:, 7:], before[:, 7:])


def test_what_cannot_be_transformed_in_place_is_refused(monkeypatch):
    monkeypatch.setenv("HELORA_FFT", "fftw")
    if fft.backend() != "fftw":
        pytest.skip("pyFFTW not installed")
    with pytest.raises(ValueError, match="C-contiguous"):
        fft.forward(fft.empty((4, 64))[:, ::2])
    with pytest.raises(TypeError, match="complex128"):
        fft.forward(np.zeros((4, 64), dtype=np.complex64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_transforming_at_once_each_get_their_own_result(backend, monkeypatch):
    """Each thread plans and runs its own transforms (pyFFTW's plans hold their arrays)."""
    monkeypatch.setenv("HELORA_FFT", backend)
    rng = np.random.default_rng(1)
    inputs = [_rows(rng, (16, 1024)) for _ in range(4)]
    outputs: list[np.ndarray | None] = [None] * 4
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        x = fft.empty((16, 1024))
        x[:] = inputs[i]
        barrier.wait()
        for _ in range(20):
            fft.forward(x)
            fft.inverse(x)
            x /= 1024
        outputs[i] = x

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_allclose(outputs[i], inputs[i], rtol=0, atol=1e-9)


def test_helora_fft_numpy_selects_numpys_transform_and_a_typo_is_an_error(monkeypatch):
    monkeypatch.setenv("HELORA_FFT", "numpy")
    assert fft.backend() == "numpy"
    monkeypatch.setenv("HELORA_FFT", "fftw3")
    with pytest.raises(ConfigError, match="HELORA_FFT"):
        fft.forward(fft.empty((2, 8)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bound_transform_runs_on_its_buffer_again_and_again(backend, monkeypatch):
    """``bound``: a plan of the buffer's own (FFTW), called without arguments after each refill."""
    monkeypatch.setenv("HELORA_FFT", backend)
    rng = np.random.default_rng(2)
    x = fft.empty((16, 1024))
    run, back = fft.bound(x), fft.bound(x, inverse=True)
    for _ in range(3):
        data = _rows(rng, x.shape)
        x[:] = data
        run()
        np.testing.assert_allclose(x, np.fft.fft(data, axis=-1), rtol=0, atol=1e-10 * np.abs(x).max())
        back()
        np.testing.assert_allclose(x, 1024 * data, rtol=0, atol=1e-9 * 1024)
    out = fft.empty(x.shape)
    into = fft.bound(x, inverse=True, out=out)  # out of place
    data = _rows(rng, x.shape)
    x[:] = data
    into()
    np.testing.assert_allclose(out, np.fft.ifft(data, axis=-1, norm="forward"), rtol=0, atol=1e-9 * 1024)
    with pytest.raises(ValueError):
        fft.bound(x, out=fft.empty((8, 1024)))
    if backend == "fftw":
        with pytest.raises(ValueError, match="aligned"):
            fft.bound(fft.empty((16 * 1024 + 1,))[1:].reshape(16, 1024))  # 16 bytes off
