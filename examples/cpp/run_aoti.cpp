// An AOTInductor package from trainkit (`to_torch_export(..., compile=True)`), run in C++ with libtorch only (no
// Python at all, no TorchScript interpreter, no autograd): a template for a C++ service.
//
//   ./run_aoti model.aoti.pt2 inputs.bin CALLS SHAPE [SHAPE ...]
//
// One SHAPE per model input, in the model's input order: its sizes joined by 'x' ("11x3"; "scalar" for a 0-d
// input), optionally after a dtype ("i32:11"; f32 by default, also f64, i32, i64). inputs.bin holds the inputs
// one after the other, each C-contiguous in its dtype (numpy: `b"".join(a.tobytes() for a in inputs)`).
// E.g. a pair potential exported with `with_forces=True` and `dynamic_axes=[{0: "atoms"}]`, at 11 atoms:
//
//   ./run_aoti lj.aoti.pt2 positions.bin 20 11x3
//
// The model is called CALLS times on the same inputs (as an MD loop calls it) and the run fails unless every call
// gives the first call's outputs bit for bit. Then each output is printed to stdout: a line "output K shape
// [d0, d1, ...]", then its values, one row of the last dimension per line (a 0-d output: one value), with enough
// digits to read the float32 back exactly (%.9g; %.17g for float64). With `with_forces=True` output 0 is the
// energy and output 1 the forces (JAX's own derivative, compiled into the package).
//
// The package checks each call's input shapes and dtypes against the program's (AOTI_RUNTIME_CHECK_INPUTS=1,
// set here unless the environment sets it): without the check, inputs of the wrong shape (3x11 for 11x3) run and
// give garbage, or read out of bounds. (torch.export assumes dynamic sizes >= 2 and the check would refuse 1; trainkit
// compiles its packages with aot_inductor.check_lowerbound off, so 1 atom runs, as it does in JAX.) torch's check
// can also refuse sizes the program allows, from guards Inductor adds while tuning kernels (a CNN traced at batch 2
// refused batch 16): run with AOTI_RUNTIME_CHECK_INPUTS=0 then, and check shapes yourself, as trainkit's Python
// loader (trainkit.export.runtime.CheckedPackage) does from the package's metadata entry trainkit.inputs.
//
// A package holds machine code for the machine it was compiled on. Before loading it, the package's metadata
// (AOTI_MACHINE, AOTI_CPU_ISA, AOTI_DEVICE_KEY, written by torch) is printed to stderr and compared with this
// process: the CPU architecture, and the vector ISA that libtorch itself would use here (this CPU's, no wider
// than ATEN_CPU_CAPABILITY allows, as trainkit.export.runtime.load_package decides in Python). A package this
// process cannot run is refused in one line instead of dying of an illegal instruction on the first call. The
// check is only as good as AOTI_CPU_ISA: torch compiles packages with -march=native unless TORCHINDUCTOR_CPP_MARCH
// is set, so one compiled on a newer CPU may use more than its ISA says (a package compiled on an AVX-512 machine
// with ATEN_CPU_CAPABILITY=avx2 says AVX2 and still holds AVX-512 code). For a package meant for older machines,
// compile it with both, e.g. ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CPP_MARCH=x86-64-v3. (trainkit also records
// the compiling CPU's instruction-set flags as the metadata entry trainkit.cpu_flags when it compiles with
// -march=native; trainkit.export.runtime.load_package compares them with /proc/cpuinfo, this program does not.)
//
// Exit status: 0 ok, 1 the model failed or a call differed from call 1, 2 bad arguments or inputs, 3 a package
// this process cannot run.
//
// Build: see CMakeLists.txt (target run_aoti), or g++ -std=c++17 with libtorch's include paths and
// -ltorch -ltorch_cpu -lc10.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <sys/utsname.h>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

struct InputSpec {
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> sizes;
};

// "11x3", "i32:11", "f64:scalar" -> dtype and sizes; throws std::invalid_argument on anything else.
InputSpec parse_shape(std::string text) {
  InputSpec spec;
  const auto colon = text.find(':');
  if (colon != std::string::npos) {
    const std::string dtype = text.substr(0, colon);
    text = text.substr(colon + 1);
    if (dtype == "f32") spec.dtype = at::kFloat;
    else if (dtype == "f64") spec.dtype = at::kDouble;
    else if (dtype == "i32") spec.dtype = at::kInt;
    else if (dtype == "i64") spec.dtype = at::kLong;
    else throw std::invalid_argument("unknown dtype " + dtype + " (f32, f64, i32, i64)");
  }
  if (text == "scalar") return spec;
  std::stringstream parts(text);
  for (std::string part; std::getline(parts, part, 'x');) {
    size_t used = 0;
    const int64_t size = std::stoll(part, &used);
    if (used != part.size() || size < 0) throw std::invalid_argument("bad size " + part);
    spec.sizes.push_back(size);
  }
  if (spec.sizes.empty()) throw std::invalid_argument("empty shape");
  return spec;
}

std::string isa_list(bool avx2, bool avx512) {
  return avx512 ? "AVX512, AVX2" : avx2 ? "AVX2" : "no vector ISA";
}

// Empty if this process can run a package compiled with `metadata`, else why not.
std::string target_problem(const std::unordered_map<std::string, std::string>& metadata) {
  auto get = [&](const char* key) {
    auto it = metadata.find(key);
    return it == metadata.end() ? std::string() : it->second;
  };
  const std::string device = get("AOTI_DEVICE_KEY");
  if (!device.empty() && device != "cpu") {
    return "it was compiled for " + device + " and this example runs CPU packages";
  }
  struct utsname host {};
  const std::string machine = get("AOTI_MACHINE");
  if (!machine.empty() && uname(&host) == 0 && machine != host.machine) {
    return "it was compiled for " + machine + " CPUs and this machine is " + host.machine;
  }
  std::string isa = get("AOTI_CPU_ISA");  // "AVX512 AVX512_VNNI", "AVX2", "INVALID_VEC_ISA" (scalar), ...
  for (char& c : isa) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (isa.empty() || isa == "INVALID_VEC_ISA") return "";
#if defined(__x86_64__) || defined(_M_X64)
  // What libtorch's own kernels use here: "AVX512", "AVX2" or "DEFAULT", from this CPU and ATEN_CPU_CAPABILITY.
  const std::string capability = at::get_cpu_capability();
  const bool avx512 = capability == "AVX512", avx2 = avx512 || capability == "AVX2";
  const char* limit = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string why = limit && *limit ? std::string(" (ATEN_CPU_CAPABILITY=") + limit + ")" : "";
  std::stringstream tokens(isa);
  for (std::string token; tokens >> token;) {
    bool ok = true;
    if (token == "AVX2") ok = avx2;
    else if (token == "AVX512") ok = avx512;
    else if (token == "AVX512_VNNI") ok = avx512 && __builtin_cpu_supports("avx512vnni");
    else if (token == "AMX_TILE") ok = avx512 && __builtin_cpu_supports("amx-tile");
    else ok = false;  // an ISA this check does not know: refuse rather than guess
    if (!ok) {
      return "it was compiled for " + isa + " CPUs and this process can run " + isa_list(avx2, avx512) + why;
    }
  }
#endif
  return "";
}

void print_output(int index, const at::Tensor& output) {
  const at::Tensor t = output.to(at::kCPU).contiguous();
  std::printf("output %d shape [", index);
  for (int64_t d = 0; d < t.dim(); ++d) std::printf(d ? ", %lld" : "%lld", static_cast<long long>(t.size(d)));
  std::printf("]\n");
  const bool integral = c10::isIntegralType(t.scalar_type(), /*includeBool=*/true);
  const char* format = integral ? "%.0f" : t.scalar_type() == at::kDouble ? "%.17g" : "%.9g";
  const at::Tensor values = t.to(at::kDouble).reshape({-1});
  const double* v = values.data_ptr<double>();
  const int64_t row = t.dim() ? t.size(-1) : 1, total = values.numel();
  for (int64_t i = 0; i < total; ++i) {
    std::printf(format, v[i]);
    std::printf((i + 1) % row == 0 ? "\n" : " ");
  }
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor x = a.to(at::kCPU).contiguous(), y = b.to(at::kCPU).contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;  // NaN == NaN, -0 != +0: bit for bit
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: run_aoti model.aoti.pt2 inputs.bin CALLS SHAPE [SHAPE ...]   (SHAPE: 11x3, i32:11, "
                 "scalar)\n";
    return 2;
  }
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);  // read by the package on its first call
  const std::string package = argv[1];
  int64_t calls = 0;
  std::vector<InputSpec> specs;
  try {
    calls = std::stoll(argv[3]);
    for (int i = 4; i < argc; ++i) specs.push_back(parse_shape(argv[i]));
  } catch (const std::exception& e) {
    std::cerr << "run_aoti: bad argument (" << e.what() << ")\n";
    return 2;
  }
  if (calls < 1) {
    std::cerr << "run_aoti: CALLS must be at least 1\n";
    return 2;
  }

  std::ifstream in(argv[2], std::ios::binary);
  std::vector<at::Tensor> inputs;
  for (const InputSpec& spec : specs) {
    at::Tensor t = at::empty(spec.sizes, at::TensorOptions().dtype(spec.dtype));
    in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    if (!in) {
      std::cerr << "run_aoti: " << argv[2] << " is shorter than the inputs' shapes need\n";
      return 2;
    }
    inputs.push_back(t);
  }
  if (in.peek() != std::char_traits<char>::eof()) {
    std::cerr << "run_aoti: " << argv[2] << " is longer than the inputs' shapes need\n";
    return 2;
  }

  std::vector<at::Tensor> first;
  try {
    // The metadata straight from the package: refuse before its code is loaded.
    const auto metadata = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package, "model");
    for (const char* key : {"AOTI_MACHINE", "AOTI_CPU_ISA", "AOTI_DEVICE_KEY"}) {
      auto it = metadata.find(key);
      std::cerr << "run_aoti: " << key << "=" << (it == metadata.end() ? "(none)" : it->second) << "\n";
    }
    const std::string problem = target_problem(metadata);
    if (!problem.empty()) {
      std::cerr << "run_aoti: cannot run " << package << ": " << problem
                << "; compile the package again on this machine\n";
      return 3;
    }

    torch::inductor::AOTIModelPackageLoader loader(package);
    first = loader.run(inputs);
    for (int64_t call = 2; call <= calls; ++call) {
      const std::vector<at::Tensor> again = loader.run(inputs);
      bool same = again.size() == first.size();
      for (size_t k = 0; same && k < first.size(); ++k) same = same_bits(again[k], first[k]);
      if (!same) {
        std::cerr << "run_aoti: call " << call << " gave a different answer than call 1\n";
        return 1;
      }
    }
  } catch (const std::exception& e) {
    std::string what = e.what();
    std::cerr << "run_aoti: " << package << ": " << what.substr(0, what.find('\n')) << "\n";
    return 1;
  }

  for (size_t k = 0; k < first.size(); ++k) print_output(static_cast<int>(k), first[k]);
  return 0;
}
