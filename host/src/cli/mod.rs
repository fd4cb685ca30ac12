//! The `sluice` subcommands, one file each. Each parses its own arguments and
//! calls into the library; none holds logic the server does not also use.

pub mod route;
