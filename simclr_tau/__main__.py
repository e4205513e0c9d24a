from simclr_tau.cli import main

main()
