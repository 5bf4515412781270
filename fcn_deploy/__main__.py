from fcn_deploy.cli import main

main()
