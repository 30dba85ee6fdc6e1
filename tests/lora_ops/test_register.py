"""``lora_ops.register`` (the ``vllm.general_plugins`` entry point): our punica wrapper on the CPU, vLLM's
elsewhere."""

from __future__ import annotations

from lora_ops.punica_cpu import GroupedPunicaWrapperCPU


def test_register_selects_our_wrapper_on_cpu():
    from vllm.lora.punica_wrapper.punica_selector import get_punica_wrapper
    from vllm.platforms import current_platform

    import lora_ops as plugin

    assert current_platform.is_cpu()
    plugin.register()
    plugin.register()  # idempotent
    assert current_platform.get_punica_wrapper() == plugin.WRAPPER_QUALNAME
    assert plugin.WRAPPER_QUALNAME.endswith(GroupedPunicaWrapperCPU.__qualname__)
    assert type(get_punica_wrapper(64, 4, "cpu")) is GroupedPunicaWrapperCPU


def test_register_is_noop_off_cpu(monkeypatch):
    import vllm.platforms

    import lora_ops as plugin

    class FakeCuda:
        def is_cpu(self):
            return False

        @classmethod
        def get_punica_wrapper(cls):
            return "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"

    monkeypatch.setattr(vllm.platforms, "_current_platform", FakeCuda())
    plugin.register()
    assert vllm.platforms.current_platform.get_punica_wrapper().endswith("PunicaWrapperGPU")
