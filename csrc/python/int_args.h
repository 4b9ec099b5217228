// Readers of the Python arguments of kv_paged.BlockManager: ints, int lists and 1-D integer
// tensors into C++ int64 values, with a ValueError naming the argument for anything else (a bool,
// a float, an int outside int64, a str). Design decision: lists are read with the CPython API
// (no per-element Python call for plain ints) and everything is read BEFORE the block manager is
// entered, because reading may run Python code (__index__) that lets another thread in.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kv_paged::python {

namespace py = pybind11;

// An int (or an object with __index__, e.g. a numpy integer), never a bool.
int64_t read_int(py::handle obj, const char* name);

// A list / tuple / other sequence of ints, or a 1-D integer tensor (any device, read in C++).
// out is cleared first; reused across calls by the caller to avoid reallocations.
void read_int_list(py::handle obj, const char* name, std::vector<int64_t>& out);

// None -> false; a str -> true and *out = its UTF-8 bytes.
bool read_optional_str(py::handle obj, const char* name, std::string* out);

}  // namespace kv_paged::python
