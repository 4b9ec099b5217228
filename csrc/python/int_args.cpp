// Argument readers of csrc/python/int_args.h. A plain int is read with
// PyLong_AsLongLongAndOverflow (no Python code runs); anything else goes through __index__ on a
// strong reference, and list sizes are re-read every element because __index__ may mutate the
// list it came from.
#include "python/int_args.h"

#include <torch/csrc/autograd/python_variable.h>

#include <ATen/ATen.h>

namespace kv_paged::python {
namespace {

[[noreturn]] void value_error(const std::string& message) { throw py::value_error(message); }

std::string type_name(py::handle obj) { return Py_TYPE(obj.ptr())->tp_name; }

std::string short_repr(py::handle obj) {
  std::string r = py::repr(obj).cast<std::string>();
  return r.size() > 40 ? r.substr(0, 37) + "..." : r;
}

// Reads an exact int; false when it does not fit int64 (the caller names the argument). Token
// ids and sequence ids are almost always "compact" ints (one 30-bit digit): those are read from the
// object directly, a third of the cost of the PyLong_AsLongLongAndOverflow call.
bool read_exact_long(PyObject* obj, int64_t* out) {
#if PY_VERSION_HEX >= 0x030C0000
  if (PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(obj))) {
    *out = static_cast<int64_t>(PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(obj)));
    return true;
  }
#elif PY_VERSION_HEX >= 0x030B0000 && PYLONG_BITS_IN_DIGIT == 30
  const Py_ssize_t size = Py_SIZE(obj);  // sign * number of digits
  if (size >= -1 && size <= 1) {
    *out = size * static_cast<int64_t>(reinterpret_cast<PyLongObject*>(obj)->ob_digit[0]);
    return true;
  }
#endif
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0) return false;
  *out = static_cast<int64_t>(v);
  return true;
}

int64_t read_int_slow(PyObject* obj, const std::string& name) {
  if (PyBool_Check(obj)) value_error(name + " must be an int, got bool " + short_repr(obj));
  if (!PyLong_Check(obj) && !PyIndex_Check(obj)) {
    value_error(name + " must be an int, got " + type_name(obj) + " " + short_repr(obj));
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj));
  if (!index) throw py::error_already_set();
  int64_t v = 0;
  if (!read_exact_long(index.ptr(), &v)) {
    value_error(name + " must be an int in [-2^63, 2^63), got " + short_repr(index));
  }
  return v;
}

void read_tensor(const at::Tensor& t, const char* name, std::vector<int64_t>& out) {
  if (t.dim() != 1 || !at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
    value_error(std::string(name) + " must be a 1-D integer tensor, got dtype " +
                std::string(c10::toString(t.scalar_type())) + " of dim " + std::to_string(t.dim()));
  }
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  out.assign(p, p + c.numel());
}

}  // namespace

int64_t read_int(py::handle obj, const char* name) {
  int64_t v = 0;
  if (PyLong_CheckExact(obj.ptr())) {
    if (!read_exact_long(obj.ptr(), &v)) {
      value_error(std::string(name) + " must be an int in [-2^63, 2^63), got " + short_repr(obj));
    }
    return v;
  }
  return read_int_slow(obj.ptr(), name);
}

void read_int_list(py::handle obj, const char* name, std::vector<int64_t>& out) {
  out.clear();
  PyObject* o = obj.ptr();
  if (THPVariable_Check(o)) return read_tensor(THPVariable_Unpack(o), name, out);
  if (PyUnicode_Check(o) || PyBytes_Check(o) || PyByteArray_Check(o) || !PySequence_Check(o)) {
    value_error(std::string(name) + " must be a sequence of ints or a 1-D integer tensor, got " +
                type_name(obj));
  }
  py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(o, name));
  if (!seq) throw py::error_already_set();
  out.reserve(static_cast<size_t>(PySequence_Fast_GET_SIZE(seq.ptr())));
  constexpr Py_ssize_t kAhead = 16;  // the int objects are scattered on the heap: fetch ahead
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq.ptr()); ++i) {
    if (i + kAhead < PySequence_Fast_GET_SIZE(seq.ptr())) {
      __builtin_prefetch(PySequence_Fast_GET_ITEM(seq.ptr(), i + kAhead));
    }
    PyObject* item = PySequence_Fast_GET_ITEM(seq.ptr(), i);
    int64_t v = 0;
    if (PyLong_CheckExact(item) && read_exact_long(item, &v)) {
      out.push_back(v);
      continue;
    }
    py::object hold = py::reinterpret_borrow<py::object>(item);  // __index__ may drop the list's
    const std::string item_name = std::string(name) + "[" + std::to_string(i) + "]";
    if (PyLong_CheckExact(item)) {
      value_error(item_name + " must be an int in [-2^63, 2^63), got " + short_repr(item));
    }
    out.push_back(read_int_slow(hold.ptr(), item_name));
  }
}

bool read_optional_str(py::handle obj, const char* name, std::string* out) {
  if (obj.is_none()) return false;
  if (!PyUnicode_Check(obj.ptr())) {
    value_error(std::string(name) + " must be a str or None, got " + type_name(obj));
  }
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
  if (data == nullptr) throw py::error_already_set();
  out->assign(data, static_cast<size_t>(size));
  return true;
}

}  // namespace kv_paged::python
