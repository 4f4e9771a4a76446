// The master's ring solver, driven from tests with made-up bandwidth matrices: which ring it
// picks, where it places a newcomer, how it schedules probes. End-to-end tests can only show one
// emulated network; these cover the solver's corners (exact sizes, heuristic sizes, ties).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "master/ring_solver.hpp"

namespace py = pybind11;

void bind_ring_solver(py::module_& m) {
    auto rs = m.def_submodule("ring_solver", "the master's bandwidth-aware ring choice, for tests");
    rs.def("ring_bottleneck", &pccl::master::ring_bottleneck, py::arg("bandwidth"), py::arg("order"));
    rs.def("best_ring", &pccl::master::best_ring, py::arg("bandwidth"), py::arg("current"));
    rs.def("best_insertion", &pccl::master::best_insertion, py::arg("bandwidth"), py::arg("order"), py::arg("newcomer"));
    rs.def("probe_rounds", &pccl::master::probe_rounds, py::arg("n"), py::arg("wanted"));
}
