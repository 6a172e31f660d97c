"""Feature caching: per-request policies that skip transformer work between denoising steps.

A request asks for one with ``SamplingParams.cache`` (``"block:F1B0:0.08"``, ``"teacache:0.2"``,
``"magcache:0.2:K3"``, ``"cfg-gate:0.5"``, combined with ``+``); ``spec.parse_cache`` checks it
before any work. ``call.CachingCall`` is the denoising stage's model call: it runs each request's
policy (``policies.py``) on that request's rows, keeps the policy's state in the request's
``PolicyState`` (per expert and CFG branch, gone with the request) and counts what was computed
and skipped in ``PolicyState.report`` (``VideoOutput.cache``). The policies compose the DiT's
``embed`` / blocks / ``head``; the model file knows nothing of them. TeaCache and MagCache need
the folder's calibration (``calibrate.py``, ``vidloom calibrate-cache``)."""

from .spec import BlockCache, CacheSpec, CfgGate, MagCache, TeaCache, parse_cache

__all__ = ["BlockCache", "CacheSpec", "CfgGate", "MagCache", "TeaCache", "parse_cache"]
