"""Files protoalign reads and writes: HDF5 schemas, structure files, atomic outputs, run provenance."""
