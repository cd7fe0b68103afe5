"""Neurons: statistics and their collection over datasets, LAPE (MMNeuron) and MINER
selection, neuron sets, and deactivation. Imports the model and base layers."""
