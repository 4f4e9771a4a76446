// pccl._core.quant: the quantisation kernels (csrc/kernels/quantize.hpp) exposed to Python as a
// testing aid. Arrays in, bytes out and back; every argument is checked here, so a bad call raises
// ValueError instead of reaching a kernel. The kernels run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/types.hpp"
#include "kernels/quantize.hpp"

namespace py = pybind11;

namespace {

using pccl::DataType;
using pccl::QuantizationAlgorithm;
using pccl::ReduceOp;
namespace quant = pccl::kernels::quant;

constexpr int kNoSourceDtype = -1;  // infer the source type from the array's dtype

DataType data_type(int code) {
    if (code < 0 || code >= pccl::kDataTypeCount) throw py::value_error("unknown DataType code " + std::to_string(code));
    return static_cast<DataType>(code);
}

QuantizationAlgorithm algorithm(int code) {
    if (code < 0 || code >= pccl::kQuantizationAlgorithmCount) {
        throw py::value_error("unknown QuantizationAlgorithm code " + std::to_string(code));
    }
    return static_cast<QuantizationAlgorithm>(code);
}

ReduceOp reduce_op(int code) {
    if (code < 0 || code >= pccl::kReduceOpCount) throw py::value_error("unknown ReduceOp code " + std::to_string(code));
    return static_cast<ReduceOp>(code);
}

quant::Format checked_format(DataType source, int wire, int algo) {
    const quant::Format f{source, data_type(wire), algorithm(algo)};
    const std::string problem = quant::validate(f);
    if (!problem.empty()) throw py::value_error(problem);
    return f;
}

// The numpy dtype that holds a source type's elements; bfloat16 travels as its uint16 bits.
py::dtype numpy_dtype(DataType t) {
    switch (t) {
        case DataType::FLOAT: return py::dtype("float32");
        case DataType::DOUBLE: return py::dtype("float64");
        case DataType::FLOAT16: return py::dtype("float16");
        case DataType::BFLOAT16: return py::dtype("uint16");
        default: throw py::value_error("not a floating-point DataType: " + std::string(pccl::to_string(t)));
    }
}

// The source type of an array: from its dtype, or `code` for 16-bit bit patterns (bfloat16 as uint16).
DataType source_of(const py::array& a, int code) {
    if (code != kNoSourceDtype) {
        const DataType t = data_type(code);
        if (static_cast<size_t>(a.itemsize()) != pccl::element_size(t)) {
            throw py::value_error("array itemsize " + std::to_string(a.itemsize()) + " does not match " +
                                  std::string(pccl::to_string(t)));
        }
        return t;
    }
    switch (a.dtype().char_()) {
        case 'f': return DataType::FLOAT;
        case 'd': return DataType::DOUBLE;
        case 'e': return DataType::FLOAT16;
        default:
            throw py::value_error("expected a float16/float32/float64 array (or pass source_dtype for bfloat16 bits)");
    }
}

py::array contiguous(const py::array& a) {
    return py::array::ensure(a, py::array::c_style);
}

py::array new_array(DataType t, size_t n) {
    const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(n)};
    return py::array(numpy_dtype(t), shape);
}

const uint8_t* wire_data(const py::buffer_info& info, const quant::Format& f, size_t n) {
    const size_t have = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
    const size_t want = quant::wire_bytes(f, n);
    if (have != want) {
        throw py::value_error("wire data has " + std::to_string(have) + " bytes; " + std::to_string(n) +
                              " elements need " + std::to_string(want));
    }
    return static_cast<const uint8_t*>(info.ptr);
}

py::bytes quantize(const py::array& array, int wire, int algo, int source_dtype) {
    const py::array src = contiguous(array);
    const quant::Format f = checked_format(source_of(src, source_dtype), wire, algo);
    const size_t n = static_cast<size_t>(src.size());
    const size_t bytes = quant::wire_bytes(f, n);
    py::bytes out = py::reinterpret_steal<py::bytes>(PyBytes_FromStringAndSize(nullptr, static_cast<py::ssize_t>(bytes)));
    if (!out) throw py::error_already_set();
    auto* dst = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out.ptr()));
    {
        py::gil_scoped_release release;
        quant::quantize(f, src.data(), n, dst);
    }
    return out;
}

py::array dequantize(const py::buffer& data, size_t n, int source, int wire, int algo) {
    const quant::Format f = checked_format(data_type(source), wire, algo);
    const py::buffer_info info = data.request();
    const uint8_t* in = wire_data(info, f, n);
    py::array out = new_array(f.source, n);
    void* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        quant::dequantize(f, in, n, dst);
    }
    return out;
}

// Returns a new array, or with in_place=True writes into `local` (which must be a writable,
// C-contiguous array) and returns it: that is the ring's dst == local case.
py::array dequantize_reduce(const py::buffer& data, const py::array& local, int op, uint32_t divide_by, int wire,
                            int algo, int source_dtype, bool in_place) {
    const py::array loc = in_place ? local : contiguous(local);
    if (in_place && (!(loc.flags() & py::array::c_style) || !loc.writeable())) {
        throw py::value_error("in_place needs a writable C-contiguous array");
    }
    const quant::Format f = checked_format(source_of(loc, source_dtype), wire, algo);
    const ReduceOp reduce = reduce_op(op);
    const size_t n = static_cast<size_t>(loc.size());
    const py::buffer_info info = data.request();
    const uint8_t* in = wire_data(info, f, n);
    py::array out = in_place ? loc : new_array(f.source, n);
    void* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        quant::dequantize_reduce(f, reduce, in, loc.data(), n, dst, divide_by);
    }
    return out;
}

}  // namespace

void bind_quant(py::module_& m) {
    auto q = m.def_submodule("quant", "quantisation kernels of the ring, for tests");
    q.attr("BLOCK_ELEMENTS") = quant::kBlockElements;
    q.attr("PARAM_BYTES_PER_BLOCK") = quant::kParamBytesPerBlock;
    q.def("quantize", &quantize, py::arg("array"), py::arg("wire_dtype"), py::arg("algorithm"),
          py::arg("source_dtype") = kNoSourceDtype,
          "Quantises a float array (bfloat16: uint16 bits with source_dtype=9) to wire bytes.");
    q.def("dequantize", &dequantize, py::arg("data"), py::arg("n"), py::arg("source_dtype"), py::arg("wire_dtype"),
          py::arg("algorithm"), "Decodes wire bytes to an array of the source type (bfloat16 as uint16 bits).");
    q.def("dequantize_reduce", &dequantize_reduce, py::arg("data"), py::arg("local"), py::arg("op"),
          py::arg("divide_by"), py::arg("wire_dtype"), py::arg("algorithm"), py::arg("source_dtype") = kNoSourceDtype,
          py::arg("in_place") = false, "op(dequantize(data), local), AVG divided by divide_by when it is not 0.");
    q.def(
        "wire_bytes",
        [](size_t n, int source, int wire, int algo) {
            return quant::wire_bytes(quant::Format{data_type(source), data_type(wire), algorithm(algo)}, n);
        },
        py::arg("n"), py::arg("source_dtype"), py::arg("wire_dtype"), py::arg("algorithm"));
    q.def(
        "validate",
        [](int source, int wire, int algo) {
            return quant::validate(quant::Format{data_type(source), data_type(wire), algorithm(algo)});
        },
        py::arg("source_dtype"), py::arg("wire_dtype"), py::arg("algorithm"),
        "Empty if the format is supported, else what is allowed.");
}
