"""kv_paged.BlockManager: the C++ block manager (csrc/block_manager.cpp + csrc/prefix_cache.cpp)
as a pybind11 class of the extension (csrc/python/block_manager_binding.cpp), used directly: no
Python layer sits between a caller and C++, so a call costs the binding's dispatch and nothing more.

Arguments are checked in C++ before anything changes (ValueError naming the argument; RuntimeError
when the pool is out of blocks). Every call holds the GIL throughout and the core never calls back
into Python, so threads sharing one manager are serialized. Types and docs: help(BlockManager) and
the stub kv_paged/_C.pyi.
"""

from __future__ import annotations

from kv_paged._C import BlockManager

__all__ = ["BlockManager"]
