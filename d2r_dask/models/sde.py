"""The mean-reverting SDE of IR-SDE (Luo et al. 2023) that the D2R restorer samples with.

Forward process, from the clean image ``x0`` towards the condition ``mu`` plus noise::

    dx = theta_t (mu - x) dt + sigma_t dW,    sigma_t**2 = 2 lambda**2 theta_t

    x_t = mu + (x0 - mu) exp(-theta_bar_t) + sigma_bar_t z,
    sigma_bar_t**2 = lambda**2 (1 - exp(-2 theta_bar_t)),    lambda = sigma_max

Time is discrete, ``t = 0..T``, with one unit of time per step: the authors' ``theta_t * dt``
(cosine schedule, ``dt = -ln(eps) / sum(theta)``) is stored here as ``theta_t``, so that
``exp(-theta_bar_T) = eps`` and ``sigma_bar_T ~= sigma_max``: ``x_T`` is ``mu`` plus stationary
noise. All schedule arithmetic is float64 and cast to the inputs' dtype and device at use.

Two parameterisations (``SDEConfig.prediction``):

- ``"noise"`` (the authors'): the network predicts the noise ``z`` of ``x_t``; ``training_loss``
  is IR-SDE's maximum-likelihood objective (L1 between the Euler-Maruyama mean of ``x_{t-1}``
  and the optimal ``x_{t-1}``), ``t`` uniform in ``1..T``.
- ``"x0"`` (ours, *predict-and-refine*): the network predicts the clean image as a residual on
  the condition, ``x0_hat = mu + net(...)``, trained with an L1 on ``x0_hat`` at the timesteps
  the few-step sampler visits (``train_times``), half of each batch at ``t = T``. At ``t = T``
  the state carries no trace of ``x0``, so the first sampler step is a deterministic mean
  predictor; later steps refine it. This learns in minutes what the noise objective needs
  hundreds of thousands of steps for (``benchmarks/results/restorer_ablation.md``).
``sample`` runs the authors' reverse SDE (``"sde"``) or one of two samplers that need fewer
network evaluations (``"ddim"``, ``"posterior"``), all drawing their Gaussian noise through an
injectable ``noise_fn`` so a blockwise engine can key it by voxel coordinates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from .config import config_from_dict

NoiseFn = Callable[[int, torch.Size], torch.Tensor]
"""``noise_fn(step_index, shape)`` -> standard-normal tensor of ``shape`` (see ``IRSDE.sample``)."""
NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model(concat(x_t - mu, mu), t)`` -> the predicted noise, or the ``x0 - mu`` residual
(``SDEConfig.prediction``), e.g. a ``ConditionalNAFNet``."""

SCHEDULES = ("cosine",)
SAMPLERS = ("sde", "ddim", "posterior")
PREDICTIONS = ("noise", "x0")


@dataclass(frozen=True)
class SDEConfig:
    """IR-SDE settings; the defaults are the D2R authors'."""

    T: int = 100
    sigma_max: float = 50 / 255
    schedule: str = "cosine"
    cosine_s: float = 0.008
    eps: float = 0.005
    prediction: str = "noise"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {PREDICTIONS}")
        if not isinstance(self.T, int) or isinstance(self.T, bool) or self.T < 1:
            raise ValueError(f"T must be an integer >= 1, got {self.T!r}")
        if not self.sigma_max > 0:
            raise ValueError(f"sigma_max must be > 0 (intensities in [0, 1]), got {self.sigma_max!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if not self.cosine_s >= 0:
            raise ValueError(f"cosine_s must be >= 0, got {self.cosine_s!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps (the mean left at t=T) must be in (0, 1), got {self.eps!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SDEConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        return config_from_dict(cls, data)


def _cosine_thetas(T: int, s: float) -> torch.Tensor:
    """The authors' cosine schedule: theta = 1 - alpha_bar on T + 3 points, trimmed to T + 1."""
    x = torch.linspace(0, T + 2, T + 3, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / (T + 2)) + s) / (1 + s) * math.pi * 0.5) ** 2
    return 1 - (alphas_cumprod / alphas_cumprod[0])[1:-1]


class IRSDE:
    """Schedule, forward marginals, training objective and samplers of the mean-reverting SDE.

    Tables indexed by ``t = 0..T`` (float64, CPU): ``thetas`` (per-step rate, ``thetas[0] = 0``),
    ``theta_bars`` (cumulative), ``sigmas`` (per-step diffusion), ``sigma_bars`` (marginal
    std). Methods take ``t`` as a Python int or a (B,) integer tensor on the inputs' device.
    """

    X0_RANGE = (-0.5, 1.5)
    """Where callers clamp the x0 estimate, in unit intensities: wide enough that the tails beyond
    the intensity mapping's percentiles survive, tight enough to stop a diverging sample."""

    def __init__(self, config: SDEConfig | None = None) -> None:
        self.config = config or SDEConfig()
        cfg = self.config
        raw = _cosine_thetas(cfg.T, cfg.cosine_s)
        raw_bar = torch.cumsum(raw, 0) - raw[0]
        thetas = raw * (-math.log(cfg.eps) / raw_bar[-1])
        thetas[0] = 0.0  # never used by a step; makes theta_bars the plain cumulative sum
        self.thetas = thetas
        self.theta_bars = torch.cumsum(thetas, 0)
        lam2 = cfg.sigma_max**2
        self.sigmas = torch.sqrt(2 * lam2 * thetas)
        self.sigma_bars = torch.sqrt(-lam2 * torch.expm1(-2 * self.theta_bars))
        post = [self._posterior_coefficients(t, t - 1) for t in range(1, cfg.T + 1)]
        self._tables = {
            "theta": thetas,
            "sigma_bar": self.sigma_bars,
            "decay": torch.exp(-self.theta_bars),
            "post_xt": torch.tensor([0.0] + [a for a, _, _ in post], dtype=torch.float64),
            "post_x0": torch.tensor([0.0] + [b for _, b, _ in post], dtype=torch.float64),
        }
        self._cast: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def T(self) -> int:
        return self.config.T

    # -- coefficients -------------------------------------------------------------------------

    def _coef(self, name: str, t: int | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
        """Table entry at ``t``: a float for an int ``t``, a (B, 1, 1, 1) tensor for a (B,) ``t``."""
        table = self._tables[name]
        if isinstance(t, int):
            if not 0 <= t <= self.T:
                raise ValueError(f"timestep {t} is outside 0..{self.T}")
            return float(table[t])
        key = (name, like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = table.to(device=like.device, dtype=like.dtype)
        return self._cast[key][t.long()].view(-1, *([1] * (like.ndim - 1)))

    def _posterior_coefficients(self, t: int, t_prev: int) -> tuple[float, float, float]:
        """``(a, b, std)`` of q(x_{t_prev} | x_t, x0) = N(mu + a (x_t - mu) + b (x0 - mu), std**2).

        With A = e^{-(theta_bar_t - theta_bar_t')}, B = e^{-theta_bar_t}, C = e^{-theta_bar_t'}:
        a = A (1 - C^2) / (1 - B^2), b = C (1 - A^2) / (1 - B^2),
        std^2 = lambda^2 (1 - A^2)(1 - C^2) / (1 - B^2); at t' = t - 1 this is IR-SDE's Eq. 14.
        """
        if not 0 <= t_prev < t <= self.T:
            raise ValueError(f"need 0 <= t_prev < t <= {self.T}, got t={t}, t_prev={t_prev}")
        bar_t, bar_p = float(self.theta_bars[t]), float(self.theta_bars[t_prev])
        one_minus_a2 = -math.expm1(-2 * (bar_t - bar_p))
        one_minus_b2 = -math.expm1(-2 * bar_t)
        one_minus_c2 = -math.expm1(-2 * bar_p)
        a = math.exp(-(bar_t - bar_p)) * one_minus_c2 / one_minus_b2
        b = math.exp(-bar_p) * one_minus_a2 / one_minus_b2
        std = self.config.sigma_max * math.sqrt(one_minus_a2 * one_minus_c2 / one_minus_b2)
        return a, b, std

    # -- forward process and the pieces of the objective --------------------------------------

    def q_sample(
        self, x0: torch.Tensor, mu: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Forward marginal ``x_t = mu + (x0 - mu) e^{-theta_bar_t} + sigma_bar_t * noise``."""
        return mu + (x0 - mu) * self._coef("decay", t, x0) + self._coef("sigma_bar", t, x0) * noise

    def score_from_noise(self, noise_pred: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Score of the marginal from predicted noise: ``-noise / sigma_bar_t`` (t >= 1)."""
        return -noise_pred / self._coef("sigma_bar", t, noise_pred)

    def reverse_sde_step(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        score: torch.Tensor,
        t: int | torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One Euler-Maruyama step t -> t-1 of the reverse SDE (dt = 1); mean only if no noise."""
        return _euler_maruyama(x, mu, score, self._coef("theta", t, x), self.config.sigma_max, noise)

    def optimal_reverse_state(
        self, x_t: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        """The optimal ``x_{t-1}`` given ``x_t`` and ``x0``: the posterior mean (IR-SDE Eq. 14)."""
        return mu + self._coef("post_xt", t, x_t) * (x_t - mu) + self._coef("post_x0", t, x_t) * (x0 - mu)

    def training_loss(
        self,
        model: NoisePredictor,
        x0: torch.Tensor,
        mu: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        train_times: list[int] | None = None,
    ) -> torch.Tensor:
        """The training loss of a batch ``x0, mu`` of shape (B, C, H, W).

        ``prediction="noise"``: IR-SDE's maximum-likelihood loss. t ~ U{1..T} per sample,
        ``x_t`` from ``q_sample``, the model predicts the noise from ``concat(x_t - mu, mu)``;
        L1 between the noiseless reverse step with that score and ``optimal_reverse_state``.

        ``prediction="x0"``: L1 between ``mu + model(...)`` and ``x0``; t is ``T`` for half of
        the batch and otherwise drawn from ``train_times`` (the sampler's grid, default
        ``1..T``), so training covers exactly the states the sampler will visit.
        """
        _check_4d("x0", x0)
        _check_4d("mu", mu)
        gen_device = generator.device if generator is not None else x0.device
        n = x0.shape[0]
        if self.config.prediction == "noise":
            t = torch.randint(1, self.T + 1, (n,), generator=generator, device=gen_device)
        else:
            times = torch.tensor(train_times or range(1, self.T + 1), device=gen_device)
            if not bool(((times >= 1) & (times <= self.T)).all()):
                raise ValueError(f"train_times must lie in 1..{self.T}, got {times.tolist()}")
            pick = times[torch.randint(0, len(times), (n,), generator=generator, device=gen_device)]
            first = torch.rand(n, generator=generator, device=gen_device) < 0.5
            t = torch.where(first, torch.full_like(pick, self.T), pick)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
        t, noise = t.to(x0.device), noise.to(x0.device)
        x_t = self.q_sample(x0, mu, t, noise)
        out = model(torch.cat([x_t - mu, mu], dim=1), t)
        if self.config.prediction == "x0":
            return F.l1_loss(mu + out, x0)
        x_prev = self.reverse_sde_step(x_t, mu, self.score_from_noise(out, t), t)
        return F.l1_loss(x_prev, self.optimal_reverse_state(x_t, x0, mu, t))

    # -- sampling -----------------------------------------------------------------------------

    def n_evaluations(self, sampler: str, steps: int | None = None) -> int:
        """Network evaluations of ``sample(sampler=..., steps=...)``; validates both."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if steps is None:
            if sampler != "sde":
                raise ValueError(f"sampler {sampler!r} needs steps (1..{self.T} network evaluations)")
            return self.T
        return self._check_steps(steps)

    def time_grid(self, steps: int) -> list[int]:
        """``steps + 1`` evenly spaced integer times from T down to 0 (strictly decreasing)."""
        steps = self._check_steps(steps)
        return [self.T * (steps - i) // steps for i in range(steps + 1)]

    def _check_steps(self, steps: int) -> int:
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.T:
            raise ValueError(f"steps must be an integer in 1..{self.T}, got {steps!r}")
        return steps

    @torch.no_grad()
    def sample(
        self,
        model: NoisePredictor,
        mu: torch.Tensor,
        *,
        sampler: str = "sde",
        steps: int | None = None,
        noise_fn: NoiseFn | None = None,
        generator: torch.Generator | None = None,
        x0_range: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Restore ``x0`` from the condition ``mu`` (B, C, H, W) by reverse diffusion.

        Samplers, each walking ``time_grid(steps)`` from ``x_T = mu + sigma_max * z``:

        - ``"sde"``: Euler-Maruyama on the reverse SDE, the authors' sampler at ``steps = T``
          (the default); fewer steps take one coarse step over ``theta_bar_t - theta_bar_t'``.
        - ``"ddim"``: deterministic. Predict ``x0`` from the noise, then jump to
          ``x_t' = mu + (x0_hat - mu) e^{-theta_bar_t'} + sigma_bar_t' * eps_hat``.
        - ``"posterior"``: stochastic. Predict ``x0``, then draw ``x_t'`` from the Gaussian
          posterior q(x_t' | x_t, x0_hat); at ``t' = t - 1`` its mean is the optimal reverse state.

        Noise: ``noise_fn(k, shape)`` supplies every standard-normal draw, ``k = 0`` for ``x_T``
        and ``k = i`` for the update after the ``i``-th network evaluation (``i = 1..steps``),
        only when that update is stochastic (every ``"sde"`` update; ``"posterior"`` updates
        except the last; ``"ddim"`` only draws ``k = 0``). Without ``noise_fn``, ``torch.randn``
        with ``generator``. ``x0_range`` clamps the predicted ``x0`` of ``"ddim"`` and
        ``"posterior"``; clamping the returned image is the caller's job.
        """
        n_steps = self.n_evaluations(sampler, steps)
        _check_4d("mu", mu)
        draw = noise_fn if noise_fn is not None else _torch_noise(generator, mu)

        def normal(k: int) -> torch.Tensor:
            z = draw(k, mu.shape)
            if tuple(z.shape) != tuple(mu.shape):
                raise ValueError(f"noise_fn({k}, shape) returned shape {tuple(z.shape)}, expected {tuple(mu.shape)}")
            return z.to(device=mu.device, dtype=mu.dtype)

        lam = self.config.sigma_max
        x = mu + lam * normal(0)
        grid = self.time_grid(n_steps)
        for k, (t, t_prev) in enumerate(zip(grid[:-1], grid[1:]), start=1):
            t_vec = torch.full((mu.shape[0],), t, device=mu.device, dtype=torch.long)
            out = model(torch.cat([x - mu, mu], dim=1), t_vec)
            x0_hat, eps = self._predict_x0(x, mu, out, t, None if sampler == "sde" else x0_range)
            if sampler == "sde":
                dtheta = float(self.theta_bars[t] - self.theta_bars[t_prev])
                x = _euler_maruyama(x, mu, self.score_from_noise(eps, t), dtheta, lam, normal(k))
                continue
            if sampler == "ddim":
                x = self.q_sample(x0_hat, mu, t_prev, eps)
            else:
                a, b, std = self._posterior_coefficients(t, t_prev)
                x = mu + a * (x - mu) + b * (x0_hat - mu)
                if t_prev > 0:
                    x = x + std * normal(k)
        return x

    def _predict_x0(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        out: torch.Tensor,
        t: int,
        x0_range: tuple[float, float] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps)`` from the network output ``out`` (noise or ``x0 - mu``), consistent with
        ``x``; ``x0_range`` clamps ``x0_hat``, and eps is recomputed from the clamped value."""
        decay, sigma_bar = self._coef("decay", t, x), self._coef("sigma_bar", t, x)
        if self.config.prediction == "x0":
            x0_hat = mu + out
        else:
            x0_hat = mu + (x - mu - sigma_bar * out) / decay
            if x0_range is None:
                return x0_hat, out
        if x0_range is not None:
            x0_hat = x0_hat.clamp(*x0_range)
        return x0_hat, (x - mu - decay * (x0_hat - mu)) / sigma_bar


def _euler_maruyama(
    x: torch.Tensor,
    mu: torch.Tensor,
    score: torch.Tensor,
    dtheta: float | torch.Tensor,
    sigma_max: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """``x - [dtheta (mu - x) - sigma^2 score] - sigma * noise`` with ``sigma^2 = 2 lambda^2 dtheta``.

    The reverse-time step of the authors' code (their ``dt`` folded into ``dtheta``).
    """
    sigma2 = 2 * sigma_max**2 * dtheta
    x = x - (dtheta * (mu - x) - sigma2 * score)
    if noise is None:
        return x
    return x - sigma2**0.5 * noise


def _torch_noise(generator: torch.Generator | None, like: torch.Tensor) -> NoiseFn:
    """Default ``noise_fn``: ``torch.randn`` from ``generator`` (on its device), ignoring ``k``."""
    device = generator.device if generator is not None else like.device

    def draw(k: int, shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=like.dtype)

    return draw


def _check_4d(name: str, x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4D (batch, channel, y, x), got shape {tuple(x.shape)}")
