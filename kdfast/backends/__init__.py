"""Fused backends. Each submodule (``cpu``, ``triton``, ``cuda``) exposes ``LOSSES`` built with
:func:`kdfast.backends._fused.build_losses` and ``unavailable_reason(device)``; the dispatcher in
:mod:`kdfast._dispatch` imports them only when asked for."""
