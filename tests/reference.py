"""Float64 reference optimizers written from docs/design.md section 1, one layer at a time.

Deliberately naive (a Python loop per layer, plain float64 arithmetic, no foreach, no sharding)
so that it reads like the spec and shares no code with the implementation under test.
"""

from __future__ import annotations

import math

import torch


class ReferenceLARSFamily:
    def __init__(
        self,
        params,
        *,
        lr,
        momentum=0.9,
        weight_decay=5e-4,
        eta=1e-3,
        tvlars=True,
        lmbda=1e-3,
        delay_steps=0,
        alpha=1.0,
        gamma_min=0.0,
        exclude_bias_and_norm=True,
        phi_on_excluded=True,
        trust_denominator="combined",
        norm_clip=None,
        nesterov=False,
        official=False,
    ):
        self.params = [p.detach().double().clone() for p in params]
        self.momenta = [torch.zeros_like(p) for p in self.params]
        self.lr, self.mu, self.wd, self.eta = lr, momentum, weight_decay, eta
        self.tvlars, self.lmbda, self.delay, self.alpha, self.gamma_min = (
            tvlars,
            lmbda,
            delay_steps,
            alpha,
            gamma_min,
        )
        self.exclude, self.phi_on_excluded = exclude_bias_and_norm, phi_on_excluded
        self.denominator, self.clip, self.nesterov, self.official = (
            trust_denominator,
            norm_clip,
            nesterov,
            official,
        )
        self.t = 0

    def phi(self):
        if not self.tvlars:
            return 1.0
        return 1.0 / (self.alpha + math.exp(self.lmbda * (self.t - self.delay))) + self.gamma_min

    def step(self, grads):
        grads = [g.double() for g in grads]
        if all(float(g.abs().sum()) == 0 for g in grads) or not all(
            bool(torch.isfinite(g).all()) for g in grads
        ):
            return
        phi = self.phi()
        for w, g, m in zip(self.params, grads, self.momenta, strict=True):
            excluded = self.exclude and w.ndim <= 1
            d = g if excluded else g + self.wd * w
            if excluded:
                s = phi if self.phi_on_excluded else 1.0
            else:
                w_norm = float(w.norm())
                den = (
                    float(d.norm())
                    if self.denominator == "combined"
                    else float(g.norm()) + self.wd * w_norm
                )
                if self.clip is not None:
                    w_norm, den = min(w_norm, self.clip), min(den, self.clip)
                if w_norm > 0 and den > 0:
                    s = phi * self.eta * w_norm / den
                else:
                    s = 1.0 if self.official else phi
            m.mul_(self.mu).add_(s * d)
            w.sub_(self.lr * (s * d + self.mu * m) if self.nesterov else self.lr * m)
        self.t += 1


class ReferenceLAMB:
    def __init__(
        self, params, *, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=5e-4, exclude=True
    ):
        self.params = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.lr, self.b1, self.b2, self.eps, self.wd, self.exclude = (
            lr,
            betas[0],
            betas[1],
            eps,
            weight_decay,
            exclude,
        )
        self.t = 0

    def step(self, grads):
        grads = [g.double() for g in grads]
        if all(float(g.abs().sum()) == 0 for g in grads):
            return
        self.t += 1
        for w, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.mul_(self.b1).add_((1 - self.b1) * g)
            v.mul_(self.b2).add_((1 - self.b2) * g * g)
            m_hat = m / (1 - self.b1**self.t)
            v_hat = v / (1 - self.b2**self.t)
            u = m_hat / (v_hat.sqrt() + self.eps)
            excluded = self.exclude and w.ndim <= 1
            if not excluded:
                u = u + self.wd * w
            w_norm, u_norm = float(w.norm()), float(u.norm())
            ratio = w_norm / u_norm if (not excluded and w_norm > 0 and u_norm > 0) else 1.0
            w.sub_(self.lr * ratio * u)
