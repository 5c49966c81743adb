// pybind11 module rstar._core: the Python face of the C++ forest (contract: rstar/_core.pyi).
//
// Every method converts and validates its numpy inputs with the GIL held (copying them, so a
// concurrent writer in Python cannot change an input between validation and use), releases
// the GIL for all engine work, and wraps the engine's result vectors as numpy arrays without
// copying. One boundary crossing per batch, never per node.
#include <pybind11/eval.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "forest.hpp"

namespace py = pybind11;
using namespace py::literals;

namespace {

// Exception classes, created in Python so that they can have two bases (see the .pyi).
PyObject* g_forest_error = nullptr;
PyObject* g_state_error = nullptr;
PyObject* g_capacity_error = nullptr;
PyObject* g_unknown_error = nullptr;

constexpr const char* kExceptionsSource = R"PY(
class ForestError(RuntimeError):
    """Base class of the engine's own errors (shape and value errors are ValueError)."""


class ForestStateError(ForestError):
    """The operation is not allowed in the node's or tree's current state (expanding a leaf
    twice, initialising a value twice, releasing a tree with open tickets)."""


class CapacityError(ForestError, MemoryError):
    """The node arena is full (max_nodes); nothing was changed."""


class UnknownIdError(ForestError, KeyError):
    """An unknown, released or already resolved tree, node or ticket id."""

    def __str__(self):
        # KeyError.__str__ would quote the message; keep it readable.
        return str(self.args[0]) if self.args else ""
)PY";

// ---- inputs ------------------------------------------------------------------------------------

py::array as_1d(const py::handle& obj, const char* what) {
  py::array a = py::array::ensure(obj);
  if (!a) throw py::value_error(std::string(what) + " must be array-like");
  if (a.ndim() != 1)
    throw py::value_error(std::string(what) + " must be a 1-D array, got " + std::to_string(a.ndim()) + " dimensions");
  return a;
}

template <class T>
std::vector<T> copy_as(const py::array& a, const char* what) {
  auto c = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!c) throw py::value_error(std::string(what) + " cannot be converted to " + py::str(py::dtype::of<T>()).cast<std::string>());
  return std::vector<T>(c.data(), c.data() + c.size());
}

// Integer ids (tree ids, node ids, tickets, payloads, n_children): integer dtypes only.
template <class T>
std::vector<T> int_array(const py::handle& obj, const char* what) {
  py::array a = as_1d(obj, what);
  if (a.size() == 0) return {};
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw py::value_error(std::string(what) + " must be integers, got dtype " + py::str(a.dtype()).cast<std::string>());
  return copy_as<T>(a, what);
}

std::vector<double> float_array(const py::handle& obj, const char* what) {
  auto c = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!c) throw py::value_error(std::string(what) + " must be convertible to float64");
  if (c.ndim() != 1)
    throw py::value_error(std::string(what) + " must be a 1-D array, got " + std::to_string(c.ndim()) + " dimensions");
  return std::vector<double>(c.data(), c.data() + c.size());
}

std::vector<std::uint8_t> bool_array(const py::handle& obj, const char* what) {
  py::array a = as_1d(obj, what);
  py::array b = a.attr("astype")("bool");
  auto c = py::array_t<bool, py::array::c_style | py::array::forcecast>::ensure(b);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(c.size()));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = c.data()[i] ? 1 : 0;
  return out;
}

std::int64_t int_id(const py::handle& obj) {
  // Python ints of any size: out-of-range ids are simply unknown.
  py::int_ v(py::reinterpret_borrow<py::object>(obj));
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0) return -1;
  return static_cast<std::int64_t>(x);
}

rstar::Rule parse_rule(const std::string& s) {
  if (s == "rstar") return rstar::Rule::RStar;
  if (s == "puct") return rstar::Rule::Puct;
  throw py::value_error("rule must be one of ('rstar', 'puct'), got '" + s + "'");
}

// ---- outputs -----------------------------------------------------------------------------------

template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule base(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        owned->data(), base);
}

py::array to_bool_numpy(std::vector<std::uint8_t>&& v) {
  auto* owned = new std::vector<std::uint8_t>(std::move(v));
  py::capsule base(owned, [](void* p) { delete static_cast<std::vector<std::uint8_t>*>(p); });
  return py::array(py::dtype("bool"), {static_cast<py::ssize_t>(owned->size())}, {py::ssize_t{1}}, owned->data(),
                   base);
}

struct PySelection {
  py::array tickets, trees, nodes, depths, path_offsets, path_nodes, path_payloads;
  std::uint64_t collisions = 0, dead_ends = 0;
  std::size_t size = 0;
};

PySelection wrap(rstar::Selection&& s) {
  PySelection p;
  p.size = s.tickets.size();
  p.collisions = s.collisions;
  p.dead_ends = s.dead_ends;
  p.tickets = to_numpy(std::move(s.tickets));
  p.trees = to_numpy(std::move(s.trees));
  p.nodes = to_numpy(std::move(s.nodes));
  p.depths = to_numpy(std::move(s.depths));
  p.path_offsets = to_numpy(std::move(s.path_offsets));
  p.path_nodes = to_numpy(std::move(s.path_nodes));
  p.path_payloads = to_numpy(std::move(s.path_payloads));
  return p;
}

py::dict stats_dict(rstar::NodeStats&& s) {
  py::dict d;
  d["visits"] = to_numpy(std::move(s.visits));
  d["pending"] = to_numpy(std::move(s.pending));
  d["value_sum"] = to_numpy(std::move(s.value_sum));
  d["q"] = to_numpy(std::move(s.q));
  d["init_value"] = to_numpy(std::move(s.init_value));
  d["prior"] = to_numpy(std::move(s.prior));
  d["reward"] = to_numpy(std::move(s.reward));
  d["state"] = to_numpy(std::move(s.state));
  d["terminal"] = to_bool_numpy(std::move(s.terminal));
  d["parent"] = to_numpy(std::move(s.parent));
  d["first_child"] = to_numpy(std::move(s.first_child));
  d["n_children"] = to_numpy(std::move(s.n_children));
  d["depth"] = to_numpy(std::move(s.depth));
  d["payload"] = to_numpy(std::move(s.payload));
  d["tree"] = to_numpy(std::move(s.tree));
  return d;
}

std::unique_ptr<rstar::Forest> make_forest(std::int64_t max_nodes, const std::string& rule, double c,
                                           const std::string& fpu_mode, double fpu_value, double virtual_loss,
                                           std::int64_t max_children, std::int64_t num_threads, std::int64_t seed) {
  if (max_nodes < 1 || max_nodes > static_cast<std::int64_t>(rstar::NONE))
    throw py::value_error("max_nodes must be in [1, 2**32 - 1], got " + std::to_string(max_nodes));
  if (max_children < 1 || max_children > 0xFFFF)
    throw py::value_error("max_children must be in [1, 65535], got " + std::to_string(max_children));
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0");
  if (seed < 0) throw py::value_error("seed must be >= 0");
  rstar::Options o;
  o.max_nodes = static_cast<std::uint64_t>(max_nodes);
  o.rule = parse_rule(rule);
  o.c = c;
  if (fpu_mode == "value")
    o.fpu_mode = rstar::FpuMode::Value;
  else if (fpu_mode == "parent")
    o.fpu_mode = rstar::FpuMode::Parent;
  else
    throw py::value_error("fpu_mode must be one of ('value', 'parent'), got '" + fpu_mode + "'");
  o.fpu_value = fpu_value;
  o.virtual_loss = virtual_loss;
  o.max_children = static_cast<std::uint32_t>(max_children);
  o.num_threads = static_cast<std::uint32_t>(std::min<std::int64_t>(num_threads, 1024));
  o.seed = static_cast<std::uint64_t>(seed);
  return std::make_unique<rstar::Forest>(o);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "C++ forest engine of rstar (contract: rstar/_core.pyi).";

  py::dict ns;
  ns["__name__"] = "rstar._core";
  ns["__builtins__"] = py::module_::import("builtins");
  py::exec(kExceptionsSource, ns);
  for (const char* name : {"ForestError", "ForestStateError", "CapacityError", "UnknownIdError"}) m.attr(name) = ns[name];
  g_forest_error = ns["ForestError"].ptr();
  g_state_error = ns["ForestStateError"].ptr();
  g_capacity_error = ns["CapacityError"].ptr();
  g_unknown_error = ns["UnknownIdError"].ptr();
  for (PyObject* e : {g_forest_error, g_state_error, g_capacity_error, g_unknown_error}) Py_INCREF(e);  // module lifetime
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const rstar::UnknownIdError& e) {
      PyErr_SetString(g_unknown_error, e.what());
    } catch (const rstar::CapacityError& e) {
      PyErr_SetString(g_capacity_error, e.what());
    } catch (const rstar::ForestStateError& e) {
      PyErr_SetString(g_state_error, e.what());
    } catch (const rstar::ForestError& e) {
      PyErr_SetString(g_forest_error, e.what());
    } catch (const rstar::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.attr("NONE") = py::int_(rstar::NONE);
  m.attr("UNEXPANDED") = py::int_(static_cast<int>(rstar::UNEXPANDED));
  m.attr("EXPANDING") = py::int_(static_cast<int>(rstar::EXPANDING));
  m.attr("EXPANDED") = py::int_(static_cast<int>(rstar::EXPANDED));
  m.attr("TERMINAL") = py::int_(static_cast<int>(rstar::TERMINAL));
  m.attr("INVALID") = py::int_(static_cast<int>(rstar::INVALID));
  m.attr("VALUE_SCALE") = py::float_(rstar::VALUE_SCALE);
  m.attr("NODE_BYTES") = py::int_(rstar::Forest::kNodeBytes);

  py::class_<PySelection>(m, "Selection", R"doc(Leaves handed out by one select call, as parallel numpy arrays (length L).

Every returned leaf was UNEXPANDED and is now EXPANDING, owned by its ticket; path_* run
from the tree root to the leaf (path_offsets has L + 1 entries).)doc")
      .def_readonly("tickets", &PySelection::tickets)
      .def_readonly("trees", &PySelection::trees)
      .def_readonly("nodes", &PySelection::nodes)
      .def_readonly("depths", &PySelection::depths)
      .def_readonly("path_offsets", &PySelection::path_offsets)
      .def_readonly("path_nodes", &PySelection::path_nodes)
      .def_readonly("path_payloads", &PySelection::path_payloads)
      .def_readonly("collisions", &PySelection::collisions)
      .def_readonly("dead_ends", &PySelection::dead_ends)
      .def("__len__", [](const PySelection& s) { return s.size; })
      .def("__repr__", [](const PySelection& s) {
        return "Selection(leaves=" + std::to_string(s.size) + ", collisions=" + std::to_string(s.collisions) +
               ", dead_ends=" + std::to_string(s.dead_ends) + ")";
      });

  using rstar::Forest;
  py::class_<Forest>(m, "Forest", "Many MCTS trees in one flat node arena (see rstar/_core.pyi).")
      .def(py::init(&make_forest), "max_nodes"_a = std::int64_t{1} << 26, py::kw_only(), "rule"_a = "rstar",
           "c"_a = 2.0, "fpu_mode"_a = "value", "fpu_value"_a = 0.0, "virtual_loss"_a = 0.0,
           "max_children"_a = 1024, "num_threads"_a = 0, "seed"_a = 0)
      .def_property_readonly("rule",
                             [](const Forest& f) { return f.options().rule == rstar::Rule::Puct ? "puct" : "rstar"; })
      .def_property_readonly("c", [](const Forest& f) { return f.options().c; })
      .def_property_readonly("num_threads", [](const Forest& f) { return f.num_threads(); })
      .def("__repr__",
           [](const Forest& f) {
             const auto ms = f.memory_stats();
             return std::string("Forest(rule='") + (f.options().rule == rstar::Rule::Puct ? "puct" : "rstar") +
                    "', c=" + py::repr(py::float_(f.options().c)).cast<std::string>() +
                    ", trees=" + std::to_string(ms.trees_live) + ", nodes=" + std::to_string(ms.nodes_in_use) + ")";
           })
      // trees
      .def(
          "add_trees",
          [](Forest& f, const py::object& payloads) {
            auto p = int_array<std::uint64_t>(payloads, "root_payloads");
            std::vector<std::uint32_t> ids;
            {
              py::gil_scoped_release nogil;
              ids = f.add_trees(p);
            }
            return to_numpy(std::move(ids));
          },
          "root_payloads"_a)
      .def(
          "roots",
          [](Forest& f, const py::object& tree_ids) {
            auto t = int_array<std::int64_t>(tree_ids, "tree_ids");
            std::vector<std::uint32_t> r;
            {
              py::gil_scoped_release nogil;
              r = f.roots(t);
            }
            return to_numpy(std::move(r));
          },
          "tree_ids"_a)
      .def(
          "release_trees",
          [](Forest& f, const py::object& tree_ids) {
            auto t = int_array<std::int64_t>(tree_ids, "tree_ids");
            py::gil_scoped_release nogil;
            return f.release_trees(t);
          },
          "tree_ids"_a)
      .def("live_trees",
           [](const Forest& f) {
             std::vector<std::uint32_t> r;
             {
               py::gil_scoped_release nogil;
               r = f.live_trees();
             }
             return to_numpy(std::move(r));
           })
      // the search cycle
      .def(
          "select",
          [](Forest& f, const py::object& tree_ids, std::int64_t k, std::optional<std::string> rule,
             std::optional<double> c) {
            auto t = int_array<std::int64_t>(tree_ids, "tree_ids");
            std::optional<rstar::Rule> r;
            if (rule) r = parse_rule(*rule);
            rstar::Selection s;
            {
              py::gil_scoped_release nogil;
              s = f.select(t, k, r, c);
            }
            return wrap(std::move(s));
          },
          "tree_ids"_a, "k"_a = 1, py::kw_only(), "rule"_a = py::none(), "c"_a = py::none())
      .def(
          "select_from",
          [](Forest& f, const py::object& nodes, std::int64_t k, std::optional<std::string> rule,
             std::optional<double> c) {
            auto n = int_array<std::int64_t>(nodes, "nodes");
            std::optional<rstar::Rule> r;
            if (rule) r = parse_rule(*rule);
            rstar::Selection s;
            {
              py::gil_scoped_release nogil;
              s = f.select_from(n, k, r, c);
            }
            return wrap(std::move(s));
          },
          "nodes"_a, "k"_a = 1, py::kw_only(), "rule"_a = py::none(), "c"_a = py::none())
      .def(
          "expand",
          [](Forest& f, const py::object& tickets, const py::object& n_children, const py::object& priors,
             const py::object& payloads, const py::object& terminal, const py::object& rewards) {
            auto tk = int_array<std::uint64_t>(tickets, "tickets");
            auto nc = int_array<std::int64_t>(n_children, "n_children");
            std::vector<double> pr, rw;
            std::vector<std::uint64_t> pl;
            std::vector<std::uint8_t> te;
            rstar::ExpandArgs a;
            a.tickets = tk;
            a.n_children = nc;
            if (!priors.is_none()) a.priors = std::span<const double>(pr = float_array(priors, "priors"));
            if (!payloads.is_none()) a.payloads = std::span<const std::uint64_t>(pl = int_array<std::uint64_t>(payloads, "payloads"));
            if (!terminal.is_none()) a.terminal = std::span<const std::uint8_t>(te = bool_array(terminal, "terminal"));
            if (!rewards.is_none()) a.rewards = std::span<const double>(rw = float_array(rewards, "rewards"));
            std::vector<std::uint32_t> firsts;
            {
              py::gil_scoped_release nogil;
              firsts = f.expand(a);
            }
            return to_numpy(std::move(firsts));
          },
          "tickets"_a, "n_children"_a, "priors"_a = py::none(), "payloads"_a = py::none(),
          "terminal"_a = py::none(), "rewards"_a = py::none())
      .def(
          "set_values",
          [](Forest& f, const py::object& nodes, const py::object& values) {
            auto n = int_array<std::int64_t>(nodes, "nodes");
            auto v = float_array(values, "values");
            py::gil_scoped_release nogil;
            f.set_values(n, v);
          },
          "nodes"_a, "values"_a)
      .def(
          "backup",
          [](Forest& f, const py::object& tickets, const py::object& values) {
            auto t = int_array<std::uint64_t>(tickets, "tickets");
            auto v = float_array(values, "values");
            py::gil_scoped_release nogil;
            f.backup(t, v);
          },
          "tickets"_a, "values"_a)
      .def(
          "backup_nodes",
          [](Forest& f, const py::object& nodes, const py::object& values) {
            auto n = int_array<std::int64_t>(nodes, "nodes");
            auto v = float_array(values, "values");
            py::gil_scoped_release nogil;
            f.backup_nodes(n, v);
          },
          "nodes"_a, "values"_a)
      .def(
          "mark_invalid",
          [](Forest& f, const py::object& nodes, double value) {
            auto n = int_array<std::int64_t>(nodes, "nodes");
            py::gil_scoped_release nogil;
            f.mark_invalid(n, value);
          },
          "nodes"_a, "value"_a = -1.0)
      .def(
          "cancel",
          [](Forest& f, const py::object& tickets) {
            auto t = int_array<std::uint64_t>(tickets, "tickets");
            py::gil_scoped_release nogil;
            f.cancel(t);
          },
          "tickets"_a)
      // reading
      .def(
          "node_stats",
          [](Forest& f, const py::object& nodes) {
            auto n = int_array<std::int64_t>(nodes, "nodes");
            rstar::NodeStats s;
            {
              py::gil_scoped_release nogil;
              s = f.node_stats(n);
            }
            return stats_dict(std::move(s));
          },
          "nodes"_a)
      .def(
          "children",
          [](Forest& f, const py::object& node) {
            const std::int64_t id = int_id(node);
            std::vector<std::uint32_t> c;
            {
              py::gil_scoped_release nogil;
              c = f.children(id);
            }
            return to_numpy(std::move(c));
          },
          "node"_a)
      .def(
          "tree_stats",
          [](Forest& f, const py::object& tree_ids) {
            auto t = int_array<std::int64_t>(tree_ids, "tree_ids");
            rstar::TreeStats s;
            {
              py::gil_scoped_release nogil;
              s = f.tree_stats(t);
            }
            py::dict d;
            d["root"] = to_numpy(std::move(s.root));
            d["visits"] = to_numpy(std::move(s.visits));
            d["q"] = to_numpy(std::move(s.q));
            d["pending"] = to_numpy(std::move(s.pending));
            d["n_nodes"] = to_numpy(std::move(s.n_nodes));
            d["open_tickets"] = to_numpy(std::move(s.open_tickets));
            d["terminal"] = to_bool_numpy(std::move(s.terminal));
            return d;
          },
          "tree_ids"_a)
      .def(
          "root_child_stats",
          [](Forest& f, const py::object& tree_ids) {
            auto t = int_array<std::int64_t>(tree_ids, "tree_ids");
            rstar::RootChildStats s;
            {
              py::gil_scoped_release nogil;
              s = f.root_child_stats(t);
            }
            py::dict d;
            d["offsets"] = to_numpy(std::move(s.offsets));
            d["node"] = to_numpy(std::move(s.node));
            d["visits"] = to_numpy(std::move(s.visits));
            d["pending"] = to_numpy(std::move(s.pending));
            d["q"] = to_numpy(std::move(s.q));
            d["prior"] = to_numpy(std::move(s.prior));
            d["init_value"] = to_numpy(std::move(s.init_value));
            d["state"] = to_numpy(std::move(s.state));
            d["terminal"] = to_bool_numpy(std::move(s.terminal));
            d["payload"] = to_numpy(std::move(s.payload));
            return d;
          },
          "tree_ids"_a)
      .def(
          "export_tree",
          [](Forest& f, const py::object& tree_id) {
            const std::int64_t id = int_id(tree_id);
            rstar::TreeExport e;
            {
              py::gil_scoped_release nogil;
              e = f.export_tree(id);
            }
            py::dict d;
            d["node"] = to_numpy(std::move(e.node));
            d["parent_index"] = to_numpy(std::move(e.parent_index));
            d["depth"] = to_numpy(std::move(e.depth));
            d["visits"] = to_numpy(std::move(e.visits));
            d["pending"] = to_numpy(std::move(e.pending));
            d["value_sum"] = to_numpy(std::move(e.value_sum));
            d["q"] = to_numpy(std::move(e.q));
            d["init_value"] = to_numpy(std::move(e.init_value));
            d["prior"] = to_numpy(std::move(e.prior));
            d["reward"] = to_numpy(std::move(e.reward));
            d["state"] = to_numpy(std::move(e.state));
            d["terminal"] = to_bool_numpy(std::move(e.terminal));
            d["payload"] = to_numpy(std::move(e.payload));
            return d;
          },
          "tree_id"_a)
      .def(
          "export_tree_dict",
          [](Forest& f, const py::object& tree_id) {
            const std::int64_t id = int_id(tree_id);
            rstar::TreeExport e;
            {
              py::gil_scoped_release nogil;
              e = f.export_tree(id);
            }
            // Breadth-first rows with parents first: build each dict, then hang it on its parent.
            std::vector<py::list> kids(e.node.size());
            py::dict root;
            for (std::size_t j = 0; j < e.node.size(); ++j) {
              py::dict d;
              d["node"] = e.node[j];
              d["payload"] = e.payload[j];
              d["visits"] = e.visits[j];
              d["pending"] = e.pending[j];
              d["value_sum"] = e.value_sum[j];
              d["q"] = e.q[j];
              d["init_value"] = std::isnan(e.init_value[j]) ? py::object(py::none()) : py::object(py::float_(e.init_value[j]));
              d["prior"] = static_cast<double>(e.prior[j]);
              d["reward"] = e.reward[j];
              d["state"] = static_cast<int>(e.state[j]);
              d["terminal"] = e.terminal[j] != 0;
              d["children"] = kids[j];
              if (e.parent_index[j] < 0)
                root = d;
              else
                kids[static_cast<std::size_t>(e.parent_index[j])].append(d);
            }
            return root;
          },
          "tree_id"_a)
      .def("memory_stats",
           [](const Forest& f) {
             const auto s = f.memory_stats();
             py::dict d;
             d["node_bytes"] = s.node_bytes;
             d["max_nodes"] = s.max_nodes;
             d["nodes_in_use"] = s.nodes_in_use;
             d["nodes_free"] = s.nodes_free;
             d["high_water"] = s.high_water;
             d["trees_live"] = s.trees_live;
             d["trees_created"] = s.trees_created;
             d["tickets_open"] = s.tickets_open;
             d["resident_bytes_estimate"] = s.resident_bytes_estimate;
             return d;
           })
      .def("stats", [](const Forest& f) {
        const auto s = f.stats();
        py::dict d;
        d["selects"] = s.selects;
        d["leaves"] = s.leaves;
        d["collisions"] = s.collisions;
        d["dead_ends"] = s.dead_ends;
        d["expansions"] = s.expansions;
        d["backups"] = s.backups;
        d["cancels"] = s.cancels;
        return d;
      });
}
