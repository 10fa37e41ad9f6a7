// A direct call of an op from Python, for fusedloss.functional in eager mode (fusedloss/ops/_registry.py).
//
// torch.ops.fusedloss.<op>.default(...) takes torch's generic boxed path from Python: pybind11's
// *args, the overload match, a schema-driven conversion of every argument with its __torch_function__
// checks, and back: about 5 us a call, as much as the kernels of a small loss. fusedloss._C.call(id,
// *args) converts the positional arguments by the schema's (few) argument kinds and calls the same
// op through the dispatcher (callBoxed, GIL released, as torch.ops does), so autograd, dispatch
// modes, fake tensors and the profiler see the same call. Whatever it does not handle (an argument
// of another kind, a tensor subclass, an active torch function mode) goes to the OpOverload given
// at registration, which is the torch.ops path itself.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <Python.h>

#include <algorithm>
#include <deque>
#include <optional>

namespace fusedloss {
namespace {

struct Entry {
  c10::OperatorHandle op;
  PyObject* fallback;  // the OpOverload, kept alive for the process
};

// The GIL released for the op's run, as torch.ops does (a Python dispatch mode takes it back).
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// A deque: references to its elements stay valid as ops are added.
std::deque<Entry>& entries() {
  static std::deque<Entry> table;
  return table;
}

// op_id(name, overload) -> an id for call(): the op "fusedloss::<name>" and the OpOverload that
// handles what call() does not.
PyObject* op_id(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "op_id(name, overload) takes 2 arguments");
    return nullptr;
  }
  const char* name = PyUnicode_AsUTF8(args[0]);
  if (name == nullptr) return nullptr;
  auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  Py_INCREF(args[1]);
  entries().push_back(Entry{handle, args[1]});
  return PyLong_FromSsize_t(static_cast<Py_ssize_t>(entries().size()) - 1);
  END_HANDLE_TH_ERRORS
}

// The IValue of a torch.Tensor or nn.Parameter argument (exactly: a subclass may have a
// __torch_function__), or nullopt when the OpOverload must take the call.
std::optional<c10::IValue> tensor_arg(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return std::nullopt;
  return c10::IValue(THPVariable_Unpack(obj));
}

// The argument as the schema's kind wants it; nullopt: the OpOverload takes the call (failed: a
// conversion error was set, to be cleared first).
std::optional<c10::IValue> convert(PyObject* obj, const c10::TypePtr& type, bool& failed) {
  switch (type->kind()) {
    case c10::TypeKind::TensorType:
      return tensor_arg(obj);
    case c10::TypeKind::OptionalType:
      if (obj == Py_None) return c10::IValue();
      if (type->castRaw<c10::OptionalType>()->getElementType()->kind() != c10::TypeKind::TensorType)
        return std::nullopt;
      return tensor_arg(obj);
    case c10::TypeKind::IntType: {
      if (!PyLong_Check(obj) || PyBool_Check(obj)) return std::nullopt;
      const long long v = PyLong_AsLongLong(obj);
      if (v == -1 && PyErr_Occurred()) {
        failed = true;
        return std::nullopt;
      }
      return c10::IValue(static_cast<int64_t>(v));
    }
    case c10::TypeKind::FloatType:
      if (PyFloat_CheckExact(obj)) return c10::IValue(PyFloat_AS_DOUBLE(obj));
      if (PyLong_Check(obj) && !PyBool_Check(obj)) {
        const double v = PyLong_AsDouble(obj);
        if (v == -1.0 && PyErr_Occurred()) {
          failed = true;
          return std::nullopt;
        }
        return c10::IValue(v);
      }
      return std::nullopt;
    case c10::TypeKind::BoolType:
      if (!PyBool_Check(obj)) return std::nullopt;
      return c10::IValue(obj == Py_True);
    default:
      return std::nullopt;
  }
}

// call(id, *args): the op's outputs as a tuple of tensors.
PyObject* call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError, "call(id, *args) needs an op id");
    return nullptr;
  }
  const Py_ssize_t id = PyLong_AsSsize_t(args[0]);
  if (id == -1 && PyErr_Occurred()) return nullptr;
  if (id < 0 || id >= static_cast<Py_ssize_t>(entries().size())) {
    PyErr_SetString(PyExc_IndexError, "fusedloss._C.call: unknown op id");
    return nullptr;
  }
  const Entry& entry = entries()[id];
  const auto& params = entry.op.schema().arguments();
  const auto& returns = entry.op.schema().returns();
  const auto fallback = [&]() { return PyObject_Vectorcall(entry.fallback, args + 1, nargs - 1, nullptr); };
  if (static_cast<size_t>(nargs - 1) != params.size() || at::impl::torch_function_mode_enabled()) return fallback();
  torch::jit::Stack stack;
  stack.reserve(std::max(params.size(), returns.size()));
  for (size_t i = 0; i < params.size(); ++i) {
    bool failed = false;
    auto value = convert(args[i + 1], params[i].type(), failed);
    if (failed) PyErr_Clear();  // e.g. an int beyond int64: the OpOverload raises what torch.ops raises
    if (!value) return fallback();
    stack.push_back(std::move(*value));
  }
  {
    ReleaseGil no_gil;
    entry.op.callBoxed(stack);
  }
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(stack.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < stack.size(); ++i) {
    PyObject* t = THPVariable_Wrap(std::move(stack[i]).toTensor());
    if (t == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), t);
  }
  return out;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"op_id", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(op_id)), METH_FASTCALL,
     "op_id(name, overload) -> int: register an op for call()"},
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call)), METH_FASTCALL,
     "call(id, *args) -> tuple: the op's outputs, as torch.ops' call of it"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fusedloss

PyMethodDef* fusedloss_python_methods() { return fusedloss::methods; }
