// Energy and forces from a trainkit-exported potential, in C++ with libtorch only (no Python at all).
//
//   ./run_potential model.pt structure.bin N [CALLS]
//
// structure.bin holds N*3 float32 positions (Å), N int32 atomic numbers and 9 float32 cell entries (rows are
// lattice vectors). Prints the energy (eV) on the first line, then N lines of forces (eV/Å). With CALLS, the
// model is called that many times on the same structure (as an MD loop calls it, with libtorch's default
// executor, which optimizes the graph after the first calls) and the run fails unless every call gives the
// same energy and forces as the first.
#include <torch/script.h>

#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::cerr << "usage: run_potential model.pt structure.bin N [CALLS]\n";
    return 2;
  }
  const int64_t n = std::stoll(argv[3]);
  const int64_t calls = argc == 5 ? std::stoll(argv[4]) : 1;
  std::ifstream in(argv[2], std::ios::binary);
  std::vector<float> positions(n * 3), cell(9);
  std::vector<int32_t> numbers(n);
  in.read(reinterpret_cast<char*>(positions.data()), positions.size() * sizeof(float));
  in.read(reinterpret_cast<char*>(numbers.data()), numbers.size() * sizeof(int32_t));
  in.read(reinterpret_cast<char*>(cell.data()), cell.size() * sizeof(float));
  if (!in) {
    std::cerr << "run_potential: " << argv[2] << " is shorter than " << n << " atoms need\n";
    return 2;
  }

  torch::jit::script::Module model = torch::jit::load(argv[1]);
  model.eval();
  std::vector<torch::jit::IValue> inputs{
      torch::from_blob(positions.data(), {1, n, 3}, torch::kFloat32).clone(),
      torch::from_blob(numbers.data(), {1, n}, torch::kInt32).clone(),
      torch::from_blob(cell.data(), {1, 3, 3}, torch::kFloat32).clone(),
  };
  auto outputs = model.forward(inputs).toTuple();  // (energy (1,), forces (1, N, 3))
  torch::Tensor energy = outputs->elements()[0].toTensor();
  torch::Tensor forces = outputs->elements()[1].toTensor().contiguous();
  for (int64_t call = 2; call <= calls; ++call) {
    auto again = model.forward(inputs).toTuple();
    if (!torch::equal(again->elements()[0].toTensor(), energy) ||
        !torch::equal(again->elements()[1].toTensor(), forces)) {
      std::cerr << "run_potential: call " << call << " gave a different answer than call 1\n";
      return 1;
    }
  }

  std::cout << std::setprecision(9) << energy.item<float>() << "\n";
  auto f = forces.accessor<float, 3>();
  for (int64_t i = 0; i < n; ++i) {
    std::cout << f[0][i][0] << " " << f[0][i][1] << " " << f[0][i][2] << "\n";
  }
  return 0;
}
