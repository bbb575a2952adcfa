"""Log-mel spectrogram as an nn.Module, so the audio front end runs inside the model (on its device)."""
from __future__ import annotations

import torch
from torch import nn


class LogMel(nn.Module):
    """waveform [B, T] -> log-mel [B, n_mels, frames]; CLAP-style defaults scaled to the sample rate."""

    mel_bank: torch.Tensor  # buffers, registered in __init__
    window: torch.Tensor

    def __init__(self, sample_rate: int = 16000, n_fft: int | None = None, hop_length: int | None = None,
                 n_mels: int = 64, f_min: float = 50.0, f_max: float | None = None):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.n_fft = n_fft or max(256, int(round(sample_rate * 1024 / 48000 / 64)) * 64)
        self.hop_length = hop_length or max(1, sample_rate // 100)  # 10 ms frames
        self.n_mels = n_mels
        f_max = min(f_max or 14000.0, sample_rate / 2)
        bank = mel_filter_bank(num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=f_min,
                               max_frequency=f_max, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("mel_bank", torch.tensor(bank, dtype=torch.float32).T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        dtype = waveform.dtype
        spec = torch.stft(waveform.float(), self.n_fft, self.hop_length, window=self.window, center=True,
                          return_complex=True).abs().pow(2)
        mel = self.mel_bank @ spec  # [B, n_mels, frames]
        return torch.log(mel.clamp_min(1e-10)).to(dtype)
